"""One module per subcommand of `shutdown-monitor`; monitor/cli.py assembles them."""
