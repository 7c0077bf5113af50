"""End-to-end latency: last byte of a chest radiograph sent -> its SR acknowledged by the PACS.

Runs the real service as production does (listener, analyze worker, deliver worker with beat, real redis-server,
SQLite) with the UNTRAINED DEMO MODELS (same architectures and engines as real weights, so the timing is real),
a DCMTK storescp as the PACS, and CXR_STUDY_STABLE_SECONDS=0. Sends single images one at a time (each its own
study) over a persistent association and prints p50/p95 plus the per-stage clock from the database.

    .venv/bin/python benchmarks/bench_e2e.py [--images 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pynetdicom import evt  # noqa: E402
from sqlalchemy import select  # noqa: E402

from cxr_triage.core.settings import Destination  # noqa: E402
from cxr_triage.db.tables import Instance, OutboxItem, StructuredReport, Study  # noqa: E402
from cxr_triage.dicom_node.sender import StoreClient  # noqa: E402
from cxr_triage.models.demo import ensure_demo_models  # noqa: E402
from tests.dicomize import nih_pngs, png_to_dx  # noqa: E402
from tests.integration.service import Service, wait_until  # noqa: E402
from tests.peers import run_storescp  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cxr-bench-e2e-"))
    models = Path("/tmp/cxr-triage-test-cache/bench-demo-models")
    ensure_demo_models(models)
    files = [png_to_dx(p, root / "in") for p in nih_pngs(args.images + 1)]
    with run_storescp(root / "pacs", ae="PACS") as (host, port, _out):
        svc = Service(root, models, pacs=f"PACS@{host}:{port}",
                      extra_env={"CXR_STUDY_STABLE_SECONDS": "0", "CXR_BATCH_WAIT_MS": "5"})
        svc.start()
        # The clock starts when the last fragment of the data set has been handed to the socket: pynetdicom's
        # EVT_PDU_SENT fires right after the send, for each P-DATA-TF PDU; the one whose data PDV carries the
        # "last fragment" bit ends the object. (The C-STORE response comes back after our answer path; the
        # figure from the response is printed too.)
        last_fragment_sent: list[float] = [0.0]

        def on_pdu_sent(event: Any) -> None:
            for item in getattr(event.pdu, "presentation_data_value_items", ()):
                if item.presentation_data_value[0] & 0x03 == 0x02:  # data set (not command), last fragment
                    last_fragment_sent[0] = time.time()

        client = StoreClient(Destination(ae_title="CXRTRIAGE", host="127.0.0.1", port=svc.dicom_port),
                             calling_ae="BENCH", evt_handlers=[(evt.EVT_PDU_SENT, on_pdu_sent)])
        latencies: list[float] = []
        from_response: list[float] = []
        stages: dict[str, list[float]] = {"receive->start": [], "start->inferred": [], "inferred->stored": [],
                                          "stored->SR acked": []}
        try:
            for i, f in enumerate(files):
                last_fragment_sent[0] = 0.0
                result = client.send(f)
                response_at = time.time()
                last_byte = last_fragment_sent[0]
                assert result.outcome == "success", result
                assert 0 < last_byte <= response_at, "no last data fragment seen"
                with svc.sessions() as s:
                    study_uid = str(__import__("pydicom").dcmread(f, stop_before_pixels=True).StudyInstanceUID)

                def acked() -> bool:
                    with svc.sessions() as s:
                        row = s.execute(
                            select(OutboxItem.sent_at).join(StructuredReport).join(Study)
                            .where(Study.study_instance_uid == study_uid, OutboxItem.state == "sent")
                        ).first()
                    return row is not None

                wait_until(acked, timeout=120, interval=0.01, what="SR acknowledged")
                if i == 0:
                    continue  # warm-up: first association, first batch
                with svc.sessions() as s:
                    inst = s.scalars(select(Instance).join(Study).where(Study.study_instance_uid == study_uid)).one()
                    sent_at = s.scalars(select(OutboxItem.sent_at).join(StructuredReport).where(
                        StructuredReport.study_pk == inst.study_pk)).one()
                latencies.append(sent_at.timestamp() - last_byte)
                from_response.append(sent_at.timestamp() - response_at)
                stages["receive->start"].append((inst.started_at - inst.received_at).total_seconds())
                stages["start->inferred"].append((inst.inferred_at - inst.started_at).total_seconds())
                stages["inferred->stored"].append((inst.stored_at - inst.inferred_at).total_seconds())
                stages["stored->SR acked"].append((sent_at - inst.stored_at).total_seconds())
        finally:
            client.close()
            svc.stop()
    print(f"end-to-end latency, last byte sent -> SR acknowledged by PACS (storescp), {len(latencies)} single images")
    print("  clock starts at the last data fragment handed to the socket (pynetdicom EVT_PDU_SENT) and stops at")
    print("  the outbox row's sent_at (the PACS's C-STORE response to our SR)")
    print(f"  p50 {statistics.median(latencies) * 1000:.0f} ms   p95 {pct(latencies, 0.95) * 1000:.0f} ms   "
          f"max {max(latencies) * 1000:.0f} ms")
    print(f"  (from the C-STORE response instead: p50 {statistics.median(from_response) * 1000:.0f} ms   "
          f"p95 {pct(from_response, 0.95) * 1000:.0f} ms)")
    for name, values in stages.items():
        print(f"  {name:18s} p50 {statistics.median(values) * 1000:7.0f} ms   p95 {pct(values, 0.95) * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
