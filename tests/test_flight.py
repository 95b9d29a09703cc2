"""A job in flight keeps its URLs compactly: one shared prefix when they follow the pattern."""

from __future__ import annotations

from conftest import a_flight as _flight


def test_standard_urls_share_one_prefix_and_read_back_exactly() -> None:
    base = "http://127.0.0.1:8080/v2/requests/"
    flights = [
        _flight(rid, f"{base}{rid}/status", f"{base}{rid}")
        for rid in ("5b0f1c2e-0000-4e8b-9f3a-1", "5b0f1c2e-0000-4e8b-9f3a-2")
    ]
    for f in flights:
        assert f.status_url == f"{base}{f.request_id}/status"
        assert f.response_url == f"{base}{f.request_id}"
    assert flights[0].urls is flights[1].urls  # one string for every job of the run


def test_other_urls_are_kept_as_given() -> None:
    f = _flight("abc", "https://x.example/poll?id=abc", "https://x.example/result/abc")
    assert f.urls == ("https://x.example/poll?id=abc", "https://x.example/result/abc")
    assert f.status_url == "https://x.example/poll?id=abc"
    assert f.response_url == "https://x.example/result/abc"
    # a response URL that ends with the id but a status URL of another shape
    g = _flight("abc", "https://x.example/abc/state", "https://x.example/abc")
    assert g.status_url == "https://x.example/abc/state"
    assert g.response_url == "https://x.example/abc"
