"""The SAP connector: business events (CloudEvents) or OData polling in, scores written back.

- :mod:`connectors.sap.cloudevents`: parsing CloudEvents (structured, binary, batched mode).
- :mod:`connectors.sap.odata`: OData v2/v4 URLs, literals, envelopes and paging (pure).
- :mod:`connectors.sap.writeback`: which result goes where, and what is written (pure).
- :mod:`connectors.sap.client`: the OData HTTP client (auth, CSRF, ETags, retries).
- :mod:`connectors.sap.connector`: the running connector (receiver, poller, writeback loop).
"""
