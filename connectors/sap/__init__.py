"""The SAP connector: business events (CloudEvents) or OData polling in, scores written back.

Pure parts:
- :mod:`connectors.sap.cloudevents`: parsing CloudEvents (structured, binary, batched mode).
- :mod:`connectors.sap.odata`: OData v2/v4 URLs, literals, envelopes and paging.
- :mod:`connectors.sap.routing`: which mapping takes an event.
- :mod:`connectors.sap.writeback`: which result goes where, and what is written.

The running connector, shaped like the Salesforce one (intake, polling, writeback):
- :mod:`connectors.sap.connector`: ``SapConnector`` (the pieces, started and stopped together)
  and ``serve``.
- :mod:`connectors.sap.core`: what the pieces share (routes, memories, counters, publishing).
- :mod:`connectors.sap.intake` behind :mod:`connectors.sap.receiver` (the webhook).
- :mod:`connectors.sap.polling`: OData delta polling.
- :mod:`connectors.sap.writeback_loop`: results written back, offsets committed after.
- :mod:`connectors.sap.history`: what was published before a restart, read back.
- :mod:`connectors.sap.client`: the OData HTTP client (auth, CSRF, ETags, retries).
"""
