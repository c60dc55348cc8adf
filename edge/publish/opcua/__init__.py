"""Verdicts for PLCs and SCADA over OPC UA (asyncua): `OpcUaChannel` (docs/opcua.md).

`contract` (namespace, node IDs, bit masks), `results` and `handshake` (plain logic),
`security` (endpoints, users, trusted certificates), `address_space` (the nodes), `server`
and `loop` (the asyncua server on its own thread), `channel` (what the node holds), `certs`
(the server certificate).
"""
