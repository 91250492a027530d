"""The official `openai` Python package against `edgediff serve` (scripts/serve-openai-test.sh
starts the server and passes EDGEDIFF_URL and EDGEDIFF_KEY).

Chat and completions, streamed and not (the streamed text equals the whole answer), stop strings,
seeded sampling, the extension object, a reasoning run streamed (its event chunks passed over) and
not, a bad request and a wrong key as the client's own typed exceptions. Prints 'openai-client: N passed, M failed' and exits non-zero on any failure.
"""

import os
import sys
import traceback

import openai
from openai import OpenAI

URL = os.environ["EDGEDIFF_URL"] + "/v1"
KEY = os.environ["EDGEDIFF_KEY"]
client = OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=120)
AR = {"edgediff": {"decoder": "ar"}}
CHAT = [
    {"role": "system", "content": "You write C."},
    {"role": "user", "content": "Write a loop that counts to ten."},
]


def chat_text(stream, **kw):
    if not stream:
        r = client.chat.completions.create(model="default", messages=CHAT, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage, roles = "", None, None, []
    chunks = client.chat.completions.create(
        model="default", messages=CHAT, stream=True, stream_options={"include_usage": True}, **kw
    )
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert roles == ["assistant"], roles
    return text, finish, usage


def completion_text(stream, prompt="int main(void) {", **kw):
    if not stream:
        r = client.completions.create(model="default", prompt=prompt, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    for c in client.completions.create(
        model="default", prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw
    ):
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            text += ch.text
            finish = ch.finish_reason or finish
    return text, finish, usage


def test_models_lists_the_served_model():
    ids = [m.id for m in client.models.list().data]
    assert ids == ["default"], ids


def test_chat_whole_and_streamed_agree():
    whole, finish, usage = chat_text(False, max_tokens=24, extra_body=AR)
    assert whole, "empty answer"
    assert finish in ("stop", "length"), finish
    assert 0 < usage.completion_tokens <= 24 and usage.prompt_tokens > 0, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    streamed, finish2, usage2 = chat_text(True, max_tokens=24, extra_body=AR)
    assert streamed == whole, (streamed, whole)
    assert finish2 == finish and usage2.completion_tokens == usage.completion_tokens


def test_chat_with_block_diffusion_defaults():
    text, finish, usage = chat_text(False, max_tokens=8)
    assert usage.completion_tokens <= 8 and finish in ("stop", "length"), (finish, usage)
    streamed, _, _ = chat_text(True, max_tokens=8)
    assert streamed == text


def test_completions_whole_and_streamed_agree():
    whole, finish, usage = completion_text(False, max_tokens=32, extra_body=AR)
    assert finish == "length" and usage.completion_tokens == 32, (finish, usage)
    streamed, finish2, usage2 = completion_text(True, max_tokens=32, extra_body=AR)
    assert streamed == whole and finish2 == finish and usage2.completion_tokens == 32


def test_stop_strings_cut_before_the_match():
    full, _, _ = completion_text(False, max_tokens=40, extra_body=AR)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    want = full[: full.index(stop)]
    for stream in (False, True):
        text, finish, _ = completion_text(stream, max_tokens=40, stop=[stop, "zzzz"], extra_body=AR)
        assert text == want and finish == "stop", (stream, text, want, finish)
    text, finish, _ = chat_text(False, max_tokens=40, stop="\n", extra_body=AR)
    assert "\n" not in text, text


def test_seeded_sampling_repeats():
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.95, seed=11, extra_body=AR)
    a, _, _ = completion_text(False, **kw)
    b, _, _ = completion_text(True, **kw)
    assert a == b, (a, b)


def test_a_bad_request_is_a_400():
    for kw in ({"n": 2}, {"max_tokens": 0}, {"temperature": -1.0}, {"extra_body": {"edgediff": {"decoder": "nope"}}}):
        try:
            client.chat.completions.create(model="default", messages=CHAT, **kw)
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body and e.body.get("message"), (kw, e.body)
        else:
            raise AssertionError(f"{kw} was accepted")


def test_a_reasoning_run_streams_its_events_then_the_same_answer():
    reason = {"edgediff": {"decoder": "ar", "reason": {
        "n": 2, "k": 2, "rounds": 1, "tail_tokens": 8, "think_budget": 4, "answer_regex": r"(\S+)\s*$"}}}
    kw = dict(model="default", messages=[{"role": "user", "content": "What is 2 + 3?"}],
              max_tokens=3, seed=4, extra_body=reason)
    whole = client.chat.completions.create(**kw)
    summary = whole.model_extra["edgediff"]
    assert summary["traces"] == 4, summary
    events, text, finish, usage, end = [], "", None, None, None
    for c in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if c.object == "edgediff.reason.event":
            assert c.choices == [], c
            events.append(c.model_extra["event"]["type"])
            continue
        for ch in c.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
            if ch.finish_reason:
                end = c.model_extra["edgediff"]
        usage = c.usage or usage
    assert events[0] == "round_started" and events[-1] == "round_done", events
    assert events.count("round_done") == 2 and events.count("trace_finished") == 4, events
    assert text == whole.choices[0].message.content and finish == "stop", (text, finish)
    assert end == summary, (end, summary)
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_a_wrong_key_is_a_401():
    for key in ("wrong", KEY + "x"):
        bad = OpenAI(base_url=URL, api_key=key, max_retries=0, timeout=30)
        try:
            bad.chat.completions.create(model="default", messages=CHAT, max_tokens=2)
        except openai.AuthenticationError as e:
            assert e.status_code == 401
        else:
            raise AssertionError("a wrong key was accepted")


def main():
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)]
    failed = 0
    for name, f in tests:
        try:
            f()
            print(f"ok      {name}")
        except Exception:
            failed += 1
            print(f"FAILED  {name}")
            traceback.print_exc()
    print(f"openai-client (openai {openai.__version__}): {len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
