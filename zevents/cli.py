"""The ``zevents`` command line (click).  Library errors are caught here and only here."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from .errors import BrokerUnavailableError, ZEventsError
from .events import Event, EventType, format_timestamp, utc_now
from .stream import BackpressurePolicy

SCRIPTED_ANSWER = (
    "ZeroMQ ",
    "moves ",
    "messages ",
    "between ",
    "processes ",
    "without ",
    "a ",
    "central ",
    "server; ",
    "zevents ",
    "adds ",
    "ordered, ",
    "resumable ",
    "streams ",
    "on ",
    "top.",
)


def scripted_events(message_id: str = "msg_demo") -> Iterator[Event]:
    """A short, plausible LLM answer as events."""
    yield Event.message_start(message_id)
    yield Event.thinking("The user wants a one-line summary.")
    yield Event.content_start(0)
    for chunk in SCRIPTED_ANSWER:
        yield Event.text_delta(chunk)
    yield Event.content_end(0)
    yield Event.usage(12, len(SCRIPTED_ANSWER), 12 + len(SCRIPTED_ANSWER))
    yield Event.message_stop(message_id, "end_turn")


def render(event: Event) -> str:
    """How ``tail`` and ``demo`` show an event: text flows, the rest gets a line."""
    if event.type is EventType.TEXT_DELTA:
        return str(event.data["text"])
    if event.type is EventType.THINKING:
        return f"[thinking] {event.data['thinking']}\n"
    if event.type is EventType.USAGE:
        d = event.data
        return (
            f"\n[usage] prompt={d['prompt_tokens']} completion={d['completion_tokens']}"
            f" total={d['total_tokens']}\n"
        )
    if event.type is EventType.MESSAGE_STOP:
        return f"[stop] {event.data['message_id']} ({event.data['stop_reason']})\n"
    if event.type is EventType.ERROR:
        return f"\n[error] {event.data['error']}\n"
    if event.type is EventType.MESSAGE_START:
        return f"[start] {event.data['message_id']}\n"
    return ""  # content block boundaries are structure, not text


F = TypeVar("F", bound=Callable[..., Any])


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.5 only
    """A byte count: ``1048576``, ``512K``, ``64M``, ``1G`` (powers of 1024)."""

    name = "bytes"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # noqa: RUF012

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in self._UNITS else ""
        try:
            n = int(float(text[: len(text) - len(unit)]) * self._UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size like 65536, 512K, 64M or 1G", param, ctx)
        if n < 1:
            self.fail(f"{value!r} must be at least one byte", param, ctx)
        return n


def _friendly(fn: F) -> F:
    """Turn library errors into one clear line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrokerUnavailableError as exc:
            click.echo(f"zevents: {exc}", err=True)
            sys.exit(3)
        except (ZEventsError, TimeoutError) as exc:
            click.echo(f"zevents: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _to_env(name: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """A click callback that puts the option's value in ``$name`` for the SDK to read."""

    def put(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value:
            os.environ[name] = value

    return put


_curve_key_option = click.option(
    "--curve-key",
    type=click.Path(exists=True, dir_okay=False),
    expose_value=False,
    callback=_to_env("ZEVENTS_CURVE_KEY"),
    help="This client's secret key file, for a CURVE broker (env ZEVENTS_CURVE_KEY).",
)
_curve_server_option = click.option(
    "--curve-server",
    type=click.Path(exists=True, dir_okay=False),
    expose_value=False,
    callback=_to_env("ZEVENTS_CURVE_SERVER"),
    help="The broker's public key file, for a CURVE broker (env ZEVENTS_CURVE_SERVER).",
)


def _broker_option(fn: F) -> F:
    """``--broker`` and the CURVE key options every client command takes."""
    fn = _curve_server_option(_curve_key_option(fn))
    return click.option(
        "--broker",
        envvar="ZEVENTS_BROKER",
        default="tcp://127.0.0.1:5555",
        show_default=True,
        help="The broker's control endpoint (env ZEVENTS_BROKER).",
    )(fn)


_timeout_option = click.option(
    "--timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for the broker to answer.",
)


@click.group()
@click.version_option(package_name="zevents")
def cli() -> None:
    """zevents: real-time event streaming for LLM output."""


@cli.command()
@click.option(
    "--control",
    envvar="ZEVENTS_CONTROL",
    default="tcp://127.0.0.1:5555",
    show_default=True,
    help="Control (ROUTER) endpoint (env ZEVENTS_CONTROL).",
)
@click.option(
    "--ingest",
    envvar="ZEVENTS_INGEST",
    default="tcp://127.0.0.1:5556",
    show_default=True,
    help="Ingest (PULL) endpoint (env ZEVENTS_INGEST).",
)
@click.option(
    "--publish",
    envvar="ZEVENTS_PUBLISH",
    default="tcp://127.0.0.1:5557",
    show_default=True,
    help="Publish (XPUB) endpoint (env ZEVENTS_PUBLISH).",
)
@click.option(
    "--buffer-size",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Default per-stream buffer size.",
)
@click.option(
    "--policy",
    type=click.Choice(["block", "drop"]),
    default="block",
    show_default=True,
    help="Default per-stream backpressure policy.",
)
@click.option(
    "--idle-timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Close streams idle this long; remove closed ones idle this long (0: never).",
)
@click.option(
    "--subscriber-timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="A silent client stops gating stream buffers after this many seconds.",
)
@click.option("--require-create", is_flag=True, help="Refuse events for streams not created first.")
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Unacknowledged events a producer may have in flight per stream.",
)
@click.option(
    "--max-parked",
    type=click.IntRange(min=1),
    default=65_536,
    show_default=True,
    help="BLOCK events waiting for room, per stream (beyond: refused as stream full).",
)
@click.option(
    "--max-message-size",
    type=ByteSize(),
    default="1M",
    show_default=True,
    help="Largest message accepted (ZeroMQ drops connections sending over twice this).",
)
@click.option(
    "--max-event-size",
    type=ByteSize(),
    default="1M",
    show_default=True,
    help="Largest single event accepted, as encoded.",
)
@click.option(
    "--max-streams",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Streams the broker holds at most.",
)
@click.option(
    "--max-subscribers",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Subscribers one stream may have at once.",
)
@click.option(
    "--max-buffered-bytes",
    type=ByteSize(),
    default="1G",
    show_default=True,
    help="Memory cap: bytes of events buffered across all streams.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, writable=True),
    envvar="ZEVENTS_DATA_DIR",
    help="Keep streams in SQLite here: acknowledged events survive a crash (env ZEVENTS_DATA_DIR).",
)
@click.option(
    "--sync",
    type=click.Choice(["normal", "full"]),
    default="normal",
    show_default=True,
    help="With --data-dir: 'normal' survives a broker crash, 'full' also power loss (slower).",
)
@click.option(
    "--curve-secret",
    type=click.Path(exists=True, dir_okay=False),
    envvar="ZEVENTS_CURVE_SECRET",
    help="The broker's secret key file (zevents keys generate): encrypt and authenticate"
    " every connection (env ZEVENTS_CURVE_SECRET).",
)
@click.option(
    "--curve-clients",
    type=click.Path(exists=True),
    envvar="ZEVENTS_CURVE_CLIENTS",
    help="Directory (or file) of authorized client public keys (env ZEVENTS_CURVE_CLIENTS).",
)
@click.option(
    "--permissions",
    type=click.Path(exists=True, dir_okay=False),
    envvar="ZEVENTS_PERMISSIONS",
    help="TOML file of per-key permissions (env ZEVENTS_PERMISSIONS); needs --curve-secret.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def broker(
    control: str,
    ingest: str,
    publish: str,
    buffer_size: int,
    policy: str,
    idle_timeout: float,
    subscriber_timeout: float,
    require_create: bool,
    window: int,
    max_parked: int,
    max_message_size: int,
    max_event_size: int,
    max_streams: int,
    max_subscribers: int,
    max_buffered_bytes: int,
    data_dir: str | None,
    sync: str,
    curve_secret: str | None,
    curve_clients: str | None,
    permissions: str | None,
    log_level: str,
) -> None:
    """Run the broker in the foreground until SIGINT or SIGTERM."""
    import zmq

    from broker.config import BrokerConfig
    from broker.server import Broker

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = BrokerConfig(
        control=control,
        ingest=ingest,
        publish=publish,
        buffer_size=buffer_size,
        policy=BackpressurePolicy.parse(policy),
        idle_timeout=idle_timeout,
        subscriber_timeout=subscriber_timeout,
        require_create=require_create,
        window=window,
        max_parked=max_parked,
        max_message_size=max_message_size,
        max_event_size=max_event_size,
        max_streams=max_streams,
        max_subscribers=max_subscribers,
        max_buffered_bytes=max_buffered_bytes,
        data_dir=data_dir,
        sync=sync,
        curve_secret=curve_secret,
        curve_clients=curve_clients,
        permissions=permissions,
    )
    try:
        server = Broker(config)
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot bind: {exc}") from exc
    except ZEventsError as exc:  # a bad key, permission file or data directory
        raise click.ClickException(str(exc)) from exc

    def stop(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.run()


def _read_events(lines: Iterator[str]) -> Iterator[tuple[int, Event | str]]:
    """Events from JSON lines (``timestamp`` optional); a bad line yields its error."""
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and "timestamp" not in obj:
                obj["timestamp"] = format_timestamp(utc_now())
            yield n, Event.from_dict(obj)
        except ValueError as exc:  # JSON errors and InvalidEventError alike
            yield n, str(exc)


@cli.command()
@click.argument("stream")
@click.option("--text", multiple=True, help="Send this text delta (repeatable) instead of stdin.")
@click.option("--close", "close_after", is_flag=True, help="Close the stream once sent.")
@_broker_option
@_timeout_option
@_friendly
def send(
    stream: str, text: tuple[str, ...], close_after: bool, broker: str, timeout: float
) -> None:
    """Send events to STREAM: JSON lines on stdin, or --text.

    Each line is an event in its JSON form, e.g.
    {"type": "TextDelta", "data": {"text": "Hi"}}; exits 0 once the broker
    acknowledged every event.
    """
    from .client import Admin, Producer

    bad = 0
    sent = 0
    with Producer(broker, timeout=timeout) as producer:
        if text:
            source: Iterator[tuple[int, Event | str]] = (
                (i, Event.text_delta(t)) for i, t in enumerate(text, 1)
            )
        else:
            source = _read_events(iter(sys.stdin))
        for n, item in source:
            if isinstance(item, str):
                click.echo(f"zevents: line {n}: {item}", err=True)
                bad += 1
                continue
            producer.send(stream, item, timeout=timeout * 12)
            sent += 1
        producer.flush(timeout=timeout * 12)
    if close_after:
        with Admin(broker, timeout=timeout) as admin:
            admin.close_stream(stream)
    if bad:
        click.echo(f"zevents: {bad} bad line(s) skipped, {sent} event(s) sent", err=True)
        sys.exit(1)


def _json_line(event: Event) -> str:
    return json.dumps(
        {
            "stream": event.stream_id,
            "seq": event.seq,
            "type": str(event.type),
            "data": event.data,
            "timestamp": format_timestamp(event.timestamp),
        },
        separators=(",", ":"),
    )


@cli.command()
@click.argument("stream")
@click.option(
    "--from-seq",
    type=click.IntRange(min=1),
    default=None,
    help="Start at this seq (default: the oldest event still buffered).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--wait", is_flag=True, help="Create the stream if it does not exist yet.")
@_broker_option
@_timeout_option
@_friendly
def tail(
    stream: str, from_seq: int | None, as_json: bool, wait: bool, broker: str, timeout: float
) -> None:
    """Follow STREAM until it closes (like tail -f)."""
    from .client import Subscriber

    with Subscriber(broker, timeout=timeout) as sub:
        for event in sub.subscribe(stream, from_seq, create=wait):
            if as_json:
                click.echo(_json_line(event))
            else:
                click.echo(render(event), nl=False)
                sys.stdout.flush()


@cli.command()
@_broker_option
@_timeout_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per stream.")
@_friendly
def streams(broker: str, timeout: float, as_json: bool) -> None:
    """List the broker's streams."""
    from .client import Admin

    with Admin(broker, timeout=timeout) as admin:
        infos = admin.list_stream_info()
    if as_json:
        for info in infos:
            click.echo(json.dumps(info.to_wire()))
        return
    head = f"{'STREAM':<32} {'POLICY':<6} {'LOAD':>11} {'SEQS':>17} {'SUBS':>4} {'STATE':<6} IDLE"
    click.echo(head)
    for i in infos:
        seqs = f"{i.first_seq}..{i.last_seq}" if i.last_seq >= i.first_seq else "-"
        state = "closed" if i.closed else "open"
        click.echo(
            f"{i.stream:<32} {i.policy:<6} {f'{i.current_load}/{i.buffer_size}':>11}"
            f" {seqs:>17} {i.subscribers:>4} {state:<6} {i.idle:.1f}s"
        )


@cli.command()
@_broker_option
@_timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the counters as JSON.")
@_friendly
def stats(broker: str, timeout: float, as_json: bool) -> None:
    """Show the broker's counters."""
    from .client import Admin

    with Admin(broker, timeout=timeout) as admin:
        st = admin.stats().to_wire()
    if as_json:
        click.echo(json.dumps(st))
        return
    for key, value in st.items():
        click.echo(f"{key}: {value}")


@cli.command()
@click.argument("stream")
@_broker_option
@_timeout_option
@_friendly
def close(stream: str, broker: str, timeout: float) -> None:
    """Close STREAM: followers get what is buffered, then the end."""
    from .client import Admin

    with Admin(broker, timeout=timeout) as admin:
        info = admin.close_stream(stream)
    click.echo(f"closed {stream} after seq {info.last_seq}")


@cli.command()
@click.option(
    "--broker",
    envvar="ZEVENTS_BROKER",
    default=None,
    help="Use this running broker (env ZEVENTS_BROKER) instead of starting one in-process.",
)
@_curve_key_option
@_curve_server_option
@_timeout_option
@_friendly
def demo(broker: str | None, timeout: float) -> None:
    """Stream a scripted LLM answer through a broker and follow it."""
    from .client import Admin, Producer, Subscriber

    server = None
    if broker is None:
        from broker.config import BrokerConfig
        from broker.server import Broker

        loopback = "tcp://127.0.0.1:0"
        server = Broker(BrokerConfig(control=loopback, ingest=loopback, publish=loopback))
        server.start()
        broker = server.endpoints["control"]
        click.echo(f"[broker] started in-process at {broker}")
    stream_id = f"demo-{threading.get_ident() % 100000}"
    try:
        with Subscriber(broker, timeout=timeout) as sub:
            following = sub.subscribe(stream_id, create=True)

            def produce() -> None:
                with Producer(broker, timeout=timeout) as producer:
                    for event in scripted_events():
                        producer.send(stream_id, event, timeout=timeout)
                with Admin(broker, timeout=timeout) as admin:
                    admin.close_stream(stream_id)

            worker = threading.Thread(target=produce, daemon=True)
            worker.start()
            for event in following:
                click.echo(render(event), nl=False)
            worker.join(timeout=timeout)
    finally:
        if server is not None:
            server.stop()
            server.join(timeout=5)


@cli.group()
def keys() -> None:
    """CurveZMQ key pairs for the broker and its clients."""


@keys.command("generate")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Where to write NAME.key (public) and NAME.key_secret (secret, mode 600).",
)
@_friendly
def generate(name: str, directory: str) -> None:
    """Write a new key pair NAME.key and NAME.key_secret.

    Give the broker its .key_secret (--curve-secret) and put each client's .key
    in the broker's --curve-clients directory; a client needs its own
    .key_secret (--curve-key) and the broker's .key (--curve-server).
    """
    from .keys import generate_keys

    public, secret = generate_keys(directory, name)
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret}  (keep it private)")


def main() -> None:
    """Entry point of the ``zevents`` script."""
    cli(prog_name="zevents")


if __name__ == "__main__":  # pragma: no cover
    main()
