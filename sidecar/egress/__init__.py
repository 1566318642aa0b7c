"""Transparent egress: HTTP_PROXY absolute-form routing, CONNECT tunnels, TLS interception.

See docs/EGRESS.md. The listener hands absolute-form requests and CONNECT to the proxy core,
which asks :class:`~sidecar.egress.gate.EgressGate` (policy, routing by host, ad-hoc upstreams)
and :class:`~sidecar.egress.connect.Tunnels` (blind tunnels and interception).
"""
