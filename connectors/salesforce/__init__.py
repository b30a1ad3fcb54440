"""The Salesforce connector: Change Data Capture over the Pub/Sub API in, scores written back
through REST. Start with :mod:`connectors.salesforce.connector` (the two loops) and
:mod:`connectors.salesforce.cdc` (what each change event means); ``docs/connectors.md``
("Connect Salesforce") describes it for operators."""
