"""A DICOMweb upstream (``query.ae_titles.<AE>.source``) answering malformed QIDO-RS: every
C-FIND, C-MOVE and C-GET bridged to it gets a failure status (0xA700 / 0xA701) and a
``bridge.upstream_failed`` line, never an aborted association with an internal-error
traceback, and the gateway keeps serving.

No DICOMweb server can be made to send such answers, so the upstream here is a small HTTP
server whose QIDO-RS answer each case sets; its WADO-RS answer is not multipart (a retrieve
that gets that far fails on it, as it would on a real misconfigured server).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tests.conftest import GatewayProcess, free_port, new_gateway
from tests.integration.test_bridge_dimse import qr_tool
from tests.integration.test_qr_scp import assert_serving


class _Upstream(BaseHTTPRequestHandler):
    qido = b"[]"  # what every QIDO-RS request gets, set per case

    def do_GET(self) -> None:
        wado = "?" not in self.path
        body = b"not multipart" if wado else type(self).qido
        self.send_response(200)
        self.send_header("Content-Type", "text/plain" if wado else "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _uid(value: object) -> dict[str, object]:
    return {"vr": "UI", "Value": [value]}


STUDY = {"0020000D": _uid("1.2.3"), "00080052": {"vr": "CS", "Value": ["STUDY"]}}
NESTED = '{"00081199": {"vr": "SQ", "Value": [' * 5000 + "{}" + "]}}" * 5000
CASES: dict[str, bytes] = {
    "element not an object": json.dumps([{"0020000D": "1.2.3"}]).encode(),
    "UID not a string": json.dumps([{"0020000D": _uid(123)}]).encode(),
    "Value an object": json.dumps([{"0020000D": {"vr": "UI", "Value": {"0": "1.2.3"}}}]).encode(),
    "count not a number": json.dumps(
        [{**STUDY, "00201208": {"vr": "IS", "Value": ["abc"]}}]
    ).encode(),
    "count element not an object": json.dumps([{**STUDY, "00201208": "3"}]).encode(),
    "tag not a tag": json.dumps([{**STUDY, "ZZZZ": {"vr": "CS"}}]).encode(),
    "sequence items not objects": json.dumps(
        [{**STUDY, "00081199": {"vr": "SQ", "Value": [1, 2]}}]
    ).encode(),
    "nested 5000 deep": f"[{NESTED}]".encode(),
    "not a JSON array": b'{"0020000D": {}}',
    "matches not objects": b"[1, 2, 3]",
    "not JSON": b"<html>login</html>",
}


@pytest.fixture(scope="module")
def bridged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gw = new_gateway(
        tmp_path_factory.mktemp("bad-upstream"),
        {
            "dimse": {"move_destinations": {"ARCHIVE": {"host": "127.0.0.1", "port": free_port()}}},
            "destinations": {
                "cloud": {
                    "type": "dicomweb",
                    "url": f"http://127.0.0.1:{server.server_address[1]}/dicom-web",
                }
            },
            "query": {"ae_titles": {"CLOUD": {"source": "cloud", "timeout": 5}}},
        },
    )
    try:
        gw.start()
        yield gw
    finally:
        gw.close_index()
        if gw.proc is not None:
            gw.terminate()
        gw.release()
        server.shutdown()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    ("tool", "status"), [("findscu", 0xA700), ("movescu", 0xA701), ("getscu", 0xA701)]
)
def test_malformed_qido_answer_gets_a_status(
    bridged: GatewayProcess, case: str, tool: str, status: int, tmp_path: Path
) -> None:
    _Upstream.qido = CASES[case]
    mark = len(bridged.log_path.read_bytes())
    keys: dict[str, str | None] = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3"}
    if tool == "findscu":
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": None, "PatientName": None}
    extra = ("-aem", "ARCHIVE") if tool == "movescu" else ()
    out = None if tool == "movescu" else tmp_path / "out"
    answer = qr_tool(tool, "CLOUD", bridged.dimse_port, keys, *extra, out=out)
    log = bridged.log_path.read_bytes()[mark:].decode(errors="replace")
    assert answer.statuses()[-1:] == [status], answer.output[-2000:]
    assert "abort" not in answer.output.lower(), answer.output[-2000:]
    assert "bridge.upstream_failed" in log
    assert "Traceback" not in log and "internal_error" not in log, log
    assert_serving(bridged)
