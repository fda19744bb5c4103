"""`shutdown-monitor lab up|down|status|list|run`: the lab (see docs/lab.md)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from monitor.errors import MonitorError


def _world(data_dir: Path | None, scale: float) -> Any:
    from monitor.lab.world import build_world

    return build_world(data_dir=data_dir, scale=scale)


_prefix = click.option("--prefix", default="smlab", show_default=True,
                       help="Name prefix of the lab's namespaces (run several labs side by side).")
_data = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Build the world from a folder laid out like ../shared/data "
                     "(country-prefixes/cc.ipv4.txt, asn/); default: the packaged data.")
_scale = click.option("--scale", type=click.FloatRange(0.05, 2.5), default=1.0,
                      show_default=True, help="Shrink or grow every country's sample of blocks.")


@click.group("lab")
def lab_group() -> None:
    """Simulated countries in network namespaces, and shutdown scenarios in lab time.

    Needs root (it creates network namespaces). Nothing it sends leaves its namespaces.
    """


@lab_group.command("up")
@_prefix
@_data
@_scale
def lab_up(prefix: str, data_dir: Path | None, scale: float) -> None:
    """Build the lab and leave it standing (ordinary conditions, no scenario)."""
    from monitor.lab.runner import write_lab_config
    from monitor.lab.topology import Lab

    try:
        world = _world(data_dir, scale)
        lab = Lab(world, prefix=prefix)
        lab.up()
        config = write_lab_config(world, lab, 300, lab.state_dir)
    except MonitorError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"lab {prefix} is up: namespaces {lab.vantage} and {lab.world_ns}, "
               f"{world.block_count()} blocks in {len(world.countries)} countries")
    click.echo(f"run the daemon in it:  ip netns exec {lab.vantage} shutdown-monitor run "
               f"--config {config}")
    click.echo(f"take it down:          shutdown-monitor lab down --prefix {prefix}")


@lab_group.command("down")
@_prefix
def lab_down(prefix: str) -> None:
    """Remove the lab: its processes, namespaces (with their links, rules) and state."""
    from monitor.lab.topology import down_by_prefix

    try:
        removed = down_by_prefix(prefix)
    except MonitorError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed: {', '.join(removed)}" if removed else f"no lab {prefix!r} was up")


@lab_group.command("status")
@_prefix
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lab_status(prefix: str, as_json: bool) -> None:
    """Is the lab up; its namespaces, and the packets that tried to leave it (must be 0)."""
    from monitor.lab.topology import (
        GUARD_TABLE,
        LabNames,
        check_prefix,
        lab_state,
        netns_exists,
        run_cmd,
    )

    try:
        names = LabNames(check_prefix(prefix))
    except MonitorError as exc:
        raise click.ClickException(str(exc)) from None
    status: dict[str, Any] = {"prefix": prefix, "up": False, "namespaces": {}}
    for ns in (names.vantage, names.world):
        entry: dict[str, Any] = {"exists": netns_exists(ns)}
        if entry["exists"]:
            done = run_cmd(["ip", "netns", "exec", ns, "nft", "-j", "list", "counter", "inet",
                            GUARD_TABLE, "escaped"], check=False)
            try:
                items = json.loads(done.stdout)["nftables"]
                entry["escaped_packets"] = next(int(i["counter"]["packets"]) for i in items
                                                if "counter" in i)
            except (ValueError, KeyError, StopIteration):
                entry["escaped_packets"] = None
        status["namespaces"][ns] = entry
    status["up"] = all(e["exists"] for e in status["namespaces"].values())
    status["state"] = lab_state(prefix)
    if as_json:
        click.echo(json.dumps(status, indent=1))
        return
    click.echo(f"lab {prefix}: {'up' if status['up'] else 'down'}")
    for ns, entry in status["namespaces"].items():
        extra = f", escaped packets {entry.get('escaped_packets')}" if entry["exists"] else ""
        click.echo(f"  {ns}: {'present' if entry['exists'] else 'absent'}{extra}")


@lab_group.command("list")
def lab_list() -> None:
    """The scenarios, with their rounds and lab time."""
    from monitor.lab.scenarios import SCENARIOS

    for name, build in SCENARIOS.items():
        s = build(False)
        click.echo(f"{name:22} {s.rounds:5d} rounds of {s.interval_s // 60:3d} min  "
                   f"{s.description}")


@lab_group.command("run")
@click.argument("scenario")
@click.option("--json", "as_json", is_flag=True,
              help="Print the run's incident JSON (DESIGN's shape) on stdout.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the incident report (Markdown, HTML, charts) of KZ into DIR.")
@click.option("--compressed", is_flag=True,
              help="The short form of the scenario (longer rounds, less history): the tests'.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the run's config, inputs and history here (default: a temporary dir).")
@click.option("--relay-port", type=click.IntRange(0, 65535),
              help="Relay the daemon's API to 127.0.0.1:PORT on the host (0: any free port).")
@click.option("--slow", type=click.FloatRange(0.0, 60.0), default=0.0,
              help="At least this many wall-clock seconds per round (to watch it live).")
@_prefix
@_data
@_scale
def lab_run(scenario: str, as_json: bool, report_dir: Path | None, compressed: bool,
            workdir: Path | None, relay_port: int | None, slow: float, prefix: str,
            data_dir: Path | None, scale: float) -> None:
    """Run SCENARIO: lab up, the daemon in the vantage in lab time, incidents, lab down.

    Exit status 0 when every expectation of the scenario is met, 1 when one is not.
    """
    from monitor.lab.runner import run_scenario
    from monitor.lab.scenarios import get_scenario
    from monitor.lab.topology import install_cleanup

    try:
        chosen = get_scenario(scenario, compressed)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="SCENARIO") from None
    install_cleanup()

    def started(_lab: object, port: int | None) -> None:
        if port is not None:
            click.echo(f"daemon API relayed to http://127.0.0.1:{port}/", err=True)

    try:
        world = _world(data_dir, scale)
        with tempfile.TemporaryDirectory(prefix="shutdown-monitor-lab-") as scratch:
            result = run_scenario(
                chosen, world, workdir or Path(scratch), prefix=prefix, relay_port=relay_port,
                min_round_wall_s=slow, report_dir=report_dir, on_started=started,
            )
    except MonitorError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    out = sys.stderr if as_json else sys.stdout
    print(f"{result.scenario}: {result.rounds} rounds, lab time {result.lab_start:%Y-%m-%d %H:%M}"
          f" .. {result.lab_end:%Y-%m-%d %H:%M} UTC, {result.wall_s:.0f} s "
          f"({result.round_s_mean:.2f} s per round)", file=out)
    if not as_json:
        for inc in result.incidents:
            print(f"  {inc['kind']:20} {inc['country']} {inc['scope']}/{inc['entity']:8} "
                  f"{inc['start']} .. {inc['end'] or 'open'}  min level {inc['min_level']}",
                  file=out)
    for check in result.checks:
        print(f"  [{'ok' if check.ok else 'FAIL'}] {check.message}", file=out)
    for note in result.notes:
        print(f"  note: {note}", file=out)
    if result.report is not None:
        print(f"  report: {result.report}", file=out)
    raise SystemExit(0 if result.ok else 1)
