"""An in-process Flower ``Grid``: runs the real ``ClientApp`` for each virtual node directly.

Flower's simulation engine (Ray) starts a Ray cluster and one worker process per virtual
client; on a 2-core machine shared by others that costs more than the training itself. This grid
implements Flower's public ``Grid`` interface (``push_messages`` / ``pull_messages`` /
``send_and_receive``) and hands every message to ``client_app(message, context)`` in this
process, one node after the other, so the same ``ServerApp`` and ``ClientApp`` code runs
unchanged. A client that raises yields an error reply (as Flower's runtimes do).

Time-outs: with ``client_timeout`` set, every client runs in a daemon thread and gets that many
seconds (each virtual node its own budget, as real nodes run in parallel); a client still running
then is abandoned and its reply never arrives, exactly like a lost node on the deployment engine,
so a client that never returns cannot stall the run.

Flower builds a ``Message`` only inside a runtime that has set the process's task identity
(``flwr.supercore.task_identity.TaskIdentity``); this grid is that runtime for the ServerApp, so
it sets it. That is the one Flower internal it touches (there is no public setter).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Iterable
from itertools import count

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

# Flower's error codes (flwr.common.constant.ErrorCode), as numbers
CLIENT_APP_RAISED_EXCEPTION = 2
MESSAGE_UNAVAILABLE = 3
SERVER_NODE_ID = 1  # the ServerApp's node id on Flower's runtimes


class _NoRun:
    """Stands in for the ``Run`` a SuperLink would hand the grid (nothing here reads it)."""

    def __init__(self, run_id: int, run_config: dict):
        self.run_id = run_id
        self.override_config = dict(run_config)


def _set_task_identity(run_id: int) -> None:
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older Flower builds messages without a task identity
        return

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE_ID


class LocalGrid(Grid):
    """Virtual SuperNodes ``node_ids`` each running ``client_app`` with its node config."""

    def __init__(self, client_app, num_nodes: int, run_config: dict, *,
                 node_configs: list[dict] | None = None, client_timeout: float | None = None,
                 run_id: int = 1):
        self.client_app = client_app
        self.client_timeout = client_timeout
        self._run = _NoRun(run_id, run_config)
        self.node_ids = [1000 + i for i in range(num_nodes)]
        if node_configs is None:
            node_configs = [{"partition-id": i, "num-partitions": num_nodes}
                            for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid, node_config=dict(nc), state=RecordDict(),
                         run_config=dict(run_config))
            for nid, nc in zip(self.node_ids, node_configs)
        }
        self.offline: set[int] = set()  # nodes that "left" (tests): never answer, not listed
        self._replies: dict[str, Message] = {}
        self._ids = count()
        _set_task_identity(run_id)
        self.log: list[dict] = []

    # -- Grid interface ------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_ids if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"local-{next(self._ids)}"
            nid = msg.metadata.dst_node_id
            if nid in self.offline:
                reply = None
            elif nid not in self.contexts:
                reply = Message(Error(MESSAGE_UNAVAILABLE, f"unknown node {nid}"), reply_to=msg)
            else:
                reply = self._deliver(msg, nid)
            if reply is not None:
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def _call(self, msg: Message, nid: int) -> Message:
        try:
            return self.client_app(msg, self.contexts[nid])
        except Exception as exc:  # noqa: BLE001 - a crashing client becomes an error reply
            reason = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    def _deliver(self, msg: Message, nid: int) -> Message | None:
        t0 = time.perf_counter()
        if self.client_timeout is None:
            reply = self._call(msg, nid)
        else:
            box: list[Message] = []
            worker = threading.Thread(target=lambda: box.append(self._call(msg, nid)),
                                      name=f"neuralign-client-{nid}", daemon=True)
            worker.start()
            worker.join(self.client_timeout)
            reply = box[0] if box else None  # still running: abandoned, never answers
        dt = time.perf_counter() - t0
        self.log.append({"node": nid, "type": msg.metadata.message_type, "seconds": dt,
                         "error": reply is None or reply.has_error()})
        if reply is None or (self.client_timeout is not None and dt > self.client_timeout):
            return None  # too late: the server never sees this reply
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        ids = self.push_messages(messages)
        return self.pull_messages(ids)
