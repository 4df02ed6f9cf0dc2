"""The ``zevents`` command line (click).  Library errors are caught here and only here."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import click

from .events import Event, EventType
from .stream import EventStream

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


@click.group()
@click.version_option(package_name="zevents")
def cli() -> None:
    """zevents: real-time event streaming for LLM output."""


@cli.command()
def demo() -> None:
    """Stream a scripted LLM answer through an EventStream and print it."""
    stream = EventStream(buffer_size=4)

    def produce() -> None:
        with stream:
            for event in scripted_events():
                stream.send(event, timeout=10)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    for event in stream:
        click.echo(render(event), nl=False)
    worker.join(timeout=10)


def main() -> None:
    """Entry point of the ``zevents`` script."""
    cli(prog_name="zevents")


if __name__ == "__main__":  # pragma: no cover
    main()
