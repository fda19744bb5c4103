"""The lab: simulated countries in Linux network namespaces, shutdown scenarios in lab time.

- `world`: real prefixes of real countries mapped onto 10.0.0.0/8 and 198.18.0.0/15 (addresses
  that exist only inside the lab's namespaces), with networks (ASNs), named endpoints and the
  control targets abroad.
- `topology`: the namespaces, the veth between them, AnyIP routes, nft and tc; safety checks.
- `conditions`: what the world looks like at one instant (cuts, churn, throttling, blocks) and
  how it is applied to the namespaces.
- `scenarios`: small declarative timelines of conditions.
- `responders`: the HTTP and DNS servers of the world namespace.
- `runner`: the daemon in the vantage namespace in lab time, then the incidents.
"""
