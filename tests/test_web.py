"""`pitome-mllm web` without a browser: uploads, settings, the side-by-side comparison on the tiny model,
the merge map, the OpenAI client against a fake server on loopback, and the command without Gradio."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

import pitome_mllm
from pitome_mllm.cli import main
from pitome_mllm.testing.openai_server import FakeOpenAIServer, serve_fake_openai
from pitome_mllm.web.openai_client import OpenAIClient, ServerError, normalize_base_url, server_sent_events
from pitome_mllm.web.session import DemoSession, MergeMap, Settings, UploadError, open_upload, settings_from_page

pytestmark = pytest.mark.model_facing


# ------------------------------------------------------------------------------------------- uploads
def test_open_upload_reads_an_image(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGBA", (40, 30), (10, 20, 30, 255)).save(path)
    image = open_upload(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_open_upload_refuses_a_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(UploadError, match="notes.png is not an image"):
        open_upload(path)


def test_open_upload_refuses_oversized_files_and_images(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(UploadError, match="big.png is .* MiB"):
        open_upload(path, max_bytes=10)
    with pytest.raises(UploadError, match="big.png is 100x100 pixels"):
        open_upload(path, max_pixels=99 * 99)


# ------------------------------------------------------------------------------------------ settings
def test_settings_from_page():
    assert settings_from_page("pitome", "reference", "target_tokens", 32.0).patch_keywords() == {
        "method": "pitome",
        "preset": "reference",
        "target_tokens": 32,
    }
    assert settings_from_page("tome", "paper", "keep_ratio", 0.9).keep_ratio == 0.9
    with pytest.raises(ValueError, match="whole number"):
        settings_from_page("pitome", "reference", "target_tokens", 3.5)
    with pytest.raises(ValueError, match="budget must be one of"):
        settings_from_page("pitome", "reference", "tokens", 3)
    with pytest.raises(ValueError, match="needs a value"):
        settings_from_page("pitome", "reference", "keep_ratio", None)


# ------------------------------------------------------------------------------------------ session
@pytest.fixture(scope="module")
def session(tiny_llava):
    return DemoSession(*tiny_llava, random_weights=True, max_new_tokens=4)


def test_plan_gives_the_patch_counts_and_leaves_the_model_unpatched(session, tiny_llava):
    settings = Settings("pitome", "reference", target_tokens=24)
    plan = session.plan(settings)
    with pitome_mllm.patched(*tiny_llava, **settings.patch_keywords()) as handle:
        assert plan.num_visual_tokens == handle.num_visual_tokens == 24
        assert plan.tokens_after_layer == [step.tokens_out for step in handle.schedule]
    assert plan.unpatched_tokens == 64
    assert pitome_mllm.get_patch(tiny_llava[0]) is None
    assert "**24** visual tokens" in plan.describe()


def test_plan_of_an_invalid_setting_raises_the_config_message(session, tiny_llava):
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0.5, 1.0\]"):
        session.plan(Settings("pitome", "reference", keep_ratio=0.2))
    assert pitome_mllm.get_patch(tiny_llava[0]) is None


def test_compare_streams_both_answers_with_their_counts_and_the_merge_map(session, tiny_llava, images):
    settings = Settings("pitome", "reference", target_tokens=24)
    updates = list(session.compare(images["chelsea"], "What is this?", settings))
    unpatched, patched, merge_map = updates[-1]
    assert unpatched.done and patched.done and not unpatched.error and not patched.error
    assert (unpatched.visual_tokens, patched.visual_tokens) == (64, 24)
    assert patched.kv_cache_bytes < unpatched.kv_cache_bytes
    assert 0 < patched.vision_s <= patched.prefill_s <= patched.total_s
    assert "**24** visual tokens" in patched.stats() and "KV cache" in patched.stats()
    assert merge_map is not None and merge_map.labels.shape == (8, 8) and merge_map.num_tokens == 24
    assert merge_map.picture.dtype == np.uint8 and merge_map.picture.shape[0] >= 336
    assert pitome_mllm.get_patch(tiny_llava[0]) is None


def test_keep_ratio_one_answers_exactly_as_the_unpatched_model(session, images):
    updates = list(
        session.compare(images["astronaut"], "Describe it.", Settings("pitome", "reference", keep_ratio=1.0))
    )
    unpatched, patched, _ = updates[-1]
    assert patched.text == unpatched.text and patched.output_tokens == unpatched.output_tokens
    assert patched.visual_tokens == unpatched.visual_tokens


def test_compare_refuses_an_empty_question(session, images):
    with pytest.raises(ValueError, match="ask a question"):
        list(session.compare(images["chelsea"], "  ", Settings("pitome", "reference", target_tokens=24)))


def test_merge_map_finds_the_token_under_a_click():
    labels = np.array([[0, 0], [1, 2]])
    merge_map = MergeMap(np.zeros((28, 28, 3)), labels)
    height, width = merge_map.picture.shape[:2]
    assert merge_map.token_at(width - 1, 0) == 0
    assert merge_map.token_at(width - 1, height - 1) == 2
    assert merge_map.describe_token(0) == "token 0 holds 2 patches: (0, 0), (0, 1)"
    assert merge_map.describe_token(0, shown=1) == "token 0 holds 2 patches: (0, 0), … (1 more)"
    assert merge_map.describe_token(2) == "token 2 holds 1 patch: (1, 1)"
    highlighted = merge_map.render(highlight_token=2)
    assert (highlighted[-1, -1] != merge_map.picture[-1, -1]).any()
    with pytest.raises(ValueError, match="outside"):
        merge_map.token_at(width, 0)


# ------------------------------------------------------------------------------------ OpenAI client
@pytest.fixture
def fake_server():
    with serve_fake_openai() as url:
        yield url


def test_client_streams_the_answer_and_the_prompt_tokens(fake_server, images):
    client = OpenAIClient(fake_server, timeout_s=10)
    updates = [(answer.text, answer.done) for answer in client.stream_answer(images["chelsea"], "What is it?", 16)]
    assert updates[0] == ("A ", False)
    final = list(client.stream_answer(images["chelsea"], "What is it?", 16))[-1]
    assert final.done and final.text == "A cat sits." and final.model == "llava-tiny"
    assert (final.prompt_tokens, final.completion_tokens) == (75, 3)
    assert final.first_piece_s is not None and "**75** prompt tokens" in final.stats()
    request = FakeOpenAIServer.requests[-1]
    assert request["model"] == "llava-tiny" and request["stream"] is True and request["temperature"] == 0.0
    image_part, text_part = request["messages"][0]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": "What is it?"}


def test_client_reports_a_refusal_and_an_unreachable_server(fake_server, images):
    FakeOpenAIServer.fail = True
    with pytest.raises(ServerError, match="HTTP 400: .*image too large"):
        list(OpenAIClient(fake_server, timeout_s=10).stream_answer(images["chelsea"], "Q?", 4))
    with pytest.raises(ServerError, match="cannot reach"):
        OpenAIClient("http://127.0.0.1:9", timeout_s=5).model_name()


def test_base_url_and_event_parsing():
    assert normalize_base_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("https://host/v1") == "https://host/v1"
    with pytest.raises(ValueError, match="--serve-url must be an http"):
        normalize_base_url("127.0.0.1:8000")
    lines = [b": keep-alive\n", b'data: {"a": 1}\n', b"\n", b"data: [DONE]\n", b'data: {"b": 2}\n']
    assert list(server_sent_events(lines)) == [{"a": 1}]
    with pytest.raises(ServerError, match="not JSON"):
        list(server_sent_events([b"data: {oops\n"]))


# ------------------------------------------------------------------------------------------- command
def test_the_command_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["web", "--model", "tiny-test"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "pip install 'pitome-mllm[web]'" in error
