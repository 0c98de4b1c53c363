"""``unimoe demo``: a missing default checkpoint or a bad MODEL is one line and exit 2; ``launch`` serves a checkpoint
directory written to disk (the path users take)."""

from __future__ import annotations

import threading

from unimoe.cli import main


def test_without_a_checkpoint_it_names_the_command_that_makes_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/tiny/final here
    assert main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("unimoe demo: error: no checkpoint at runs/tiny/final")
    assert "make quickstart" in err and "unimoe run tiny --out runs/tiny" in err


def test_a_bad_model_path_is_one_line(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not exist" in err


def test_launch_serves_a_checkpoint_from_disk(model_and_processor, tmp_path, port):
    from gradio_client import Client

    from unimoe.demo import launch
    from unimoe.hub import save_checkpoint

    model, processor = model_and_processor
    ckpt = save_checkpoint(model, tmp_path / "ckpt", processor=processor)
    app = launch(ckpt, port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        out = client.predict({"text": "hello", "files": []}, api_name="/chat", max_new_tokens=2, temperature=1.0)
        threading.Thread(target=client.close, daemon=True).start()
        assert out[5]["error"] is None and out[5]["prompt"] == "hello"
        header = [c["props"].get("value") for c in app.config["components"] if c.get("type") == "markdown"]
        assert any(str(ckpt) in str(v) for v in header)  # the header names the checkpoint it serves
    finally:
        app.close()
