"""Bytes the federation's server sends to and receives from the parties, counted at Flower's Grid.

Each message is measured as the protobuf Flower puts on the wire between the SuperLink and the
ServerApp (`message_to_proto(...).ByteSize()`), so the count is the same in simulation and on the
deployment engine, and includes SecAgg+'s key exchange and masked vectors when it is on.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run


def message_bytes(message: Message) -> int:
    """Serialized size of `message` (content or error, and metadata) in bytes."""
    return int(message_to_proto(message).ByteSize())


class CountingGrid(Grid):
    """A Grid that forwards every call to `inner` and adds up the bytes of the messages it carries."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.bytes_sent = 0
        """Bytes of the messages the server sent to parties."""
        self.bytes_received = 0
        """Bytes of the replies it received, errors included."""
        self.messages_sent = 0
        self.messages_received = 0

    def snapshot(self) -> dict[str, int]:
        """The counters, as a dict for a metrics line."""
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
        }

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_sent(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count_received(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._count_sent(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._count_received(replies)
        return replies

    def _count_sent(self, messages: list[Message]) -> None:
        self.bytes_sent += sum(message_bytes(m) for m in messages)
        self.messages_sent += len(messages)

    def _count_received(self, replies: list[Message]) -> None:
        self.bytes_received += sum(message_bytes(m) for m in replies)
        self.messages_received += len(replies)
