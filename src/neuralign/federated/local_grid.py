"""An in-process Flower ``Grid``: runs the real ``ClientApp`` for each virtual node directly.

Flower's simulation engine (Ray) starts a Ray cluster and one worker process per virtual
client; on a 2-core machine shared by others that costs more than the training itself. This grid
implements Flower's ``Grid`` interface (``push_messages`` / ``pull_messages`` /
``send_and_receive``) and hands every message to ``client_app(message, context)`` in this
process, one node after the other, so the same ``ServerApp`` and ``ClientApp`` code runs
unchanged. A client that raises yields an error reply (as Flower's runtimes do); one that runs
longer than ``client_timeout`` seconds has its reply dropped (as if it timed out).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """Virtual SuperNodes ``node_ids`` each running ``client_app`` with its node config."""

    def __init__(self, client_app, num_nodes: int, run_config: dict, *,
                 node_configs: list[dict] | None = None, client_timeout: float | None = None,
                 run_id: int = 1):
        self.client_app = client_app
        self.client_timeout = client_timeout
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config)
        self.node_ids = [1000 + i for i in range(num_nodes)]
        if node_configs is None:
            node_configs = [{"partition-id": i, "num-partitions": num_nodes}
                            for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid, node_config=dict(nc), state=RecordDict(),
                         run_config=dict(run_config))
            for nid, nc in zip(self.node_ids, node_configs)
        }
        self._replies: dict[str, Message] = {}
        # Messages read the sender's identity from the process-wide TaskIdentity (set by
        # Flower's runtimes for the ServerApp process); this process plays the ServerApp.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.log: list[dict] = []

    # -- Grid interface ------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            nid = msg.metadata.dst_node_id
            if nid not in self.contexts:
                reply = Message(Error(ErrorCode.MESSAGE_UNAVAILABLE, f"unknown node {nid}"),
                                reply_to=msg)
            else:
                reply = self._deliver(msg, nid)
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def _deliver(self, msg: Message, nid: int) -> Message | None:
        t0 = time.perf_counter()
        try:
            reply = self.client_app(msg, self.contexts[nid])
        except Exception as exc:  # a crashing client becomes an error reply
            reason = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        dt = time.perf_counter() - t0
        self.log.append({"node": nid, "type": msg.metadata.message_type, "seconds": dt,
                         "error": reply.has_error()})
        if self.client_timeout is not None and dt > self.client_timeout:
            return None  # too late: the server never sees this reply
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        ids = self.push_messages(messages)
        return self.pull_messages(ids)
