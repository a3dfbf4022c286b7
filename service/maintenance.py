"""The server's periodic housekeeping, so that nothing grows with the requests it has served:

- finished futures leave memory after `future_keep_s` and the database after `future_ttl_s`;
- checkpoints past their TTL are deleted (record, then files);
- requests stuck behind a seq_id that never came are failed (`service.ordering`);
- a session silent for `session_timeout_s` (the SDK heartbeats every 10 s, and warns its user after
  2 minutes without one that the session will be terminated) is finished as "expired": its adapters
  and samplers are freed, its checkpoints stay.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from service import store as st
from service.routes.checkpoints import delete_files
from service.state import ServerState

log = logging.getLogger(__name__)


async def tick(state: ServerState) -> dict[str, int]:
    now = st.utcnow()
    done = {
        "evicted": state.futures.evict(),
        "purged": state.store.purge_futures(now - dt.timedelta(seconds=state.config.future_ttl_s)),
        "gaps_failed": state.queues.expire(),
        "expired_checkpoints": 0,
    }
    for row in state.store.expired_checkpoints(now):
        delete_files(state, row)
        done["expired_checkpoints"] += 1
    stale = state.store.stale_sessions(now - dt.timedelta(seconds=state.config.session_timeout_s))
    for session in stale:
        state.store.update(st.SessionRow, session.id, finished_at=now, finish_reason="expired")
        state.metrics.sessions_active.dec()
        await state.release_session(session.id)
    done["expired_sessions"] = len(stale)
    if any(done.values()):
        log.info("maintenance", extra={"fields": done})
    return done


async def run_forever(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.config.maintenance_every_s)
        try:
            await tick(state)
        except Exception:
            log.exception("maintenance failed")
