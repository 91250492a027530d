//! `edgediff serve` over real sockets, on the default model and the CPU backend: concurrent
//! clients get exactly the tokens of solo decoding (greedy and seeded sampling, AR and block
//! diffusion), a client that goes away frees its sequence and KV at once, bad requests are
//! OpenAI-shaped errors with the right status, the API key is enforced, a full queue is a 429 with
//! Retry-After, and a slow reader neither loses text nor holds up the others. Reasoning runs
//! (`"edgediff": {"reason": …}`) stream their rounds' events, are admitted round by round under
//! the same slots and KV budget, and stop when their client leaves.
//!
//! The client is a few lines of HTTP/1.1 over `TcpStream`, so each test controls exactly what
//! goes on the wire (malformed bodies, half-read streams, dropped connections).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use edgediff::decode::{DecodeParams, DecoderKind, Sampling};
use edgediff::engine::{BackendChoice, EngineConfig, LoadedEngine, Prompt};
use edgediff::serve::{Limits, RequestLimits, ServeConfig, Server};
use serde_json::{json, Value};

fn engine() -> Arc<LoadedEngine> {
    static ENGINE: OnceLock<Arc<LoadedEngine>> = OnceLock::new();
    ENGINE.get_or_init(own_engine).clone()
}

/// An engine no other test's server shares: its batched passes (and their metrics) are its
/// requests' alone.
fn own_engine() -> Arc<LoadedEngine> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/default.edm");
    let config = EngineConfig {
        backend: BackendChoice::Cpu,
        ..EngineConfig::default()
    };
    Arc::new(LoadedEngine::load(path, &config).expect("the default model loads"))
}

struct Setup {
    max_batch: usize,
    max_queue: usize,
    kv_budget: u64,
    api_key: Option<&'static str>,
    max_body: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            max_batch: 4,
            max_queue: 16,
            kv_budget: 1 << 30,
            api_key: None,
            max_body: 64 << 10,
        }
    }
}

fn server(s: Setup) -> Server {
    server_on(engine(), s)
}

fn server_on(engine: Arc<LoadedEngine>, s: Setup) -> Server {
    let defaults = engine.default_decoding();
    let config = ServeConfig {
        model_id: "default".into(),
        api_key: s.api_key.map(String::from),
        limits: Limits {
            max_batch: s.max_batch,
            kv_budget: s.kv_budget,
            max_queue: s.max_queue,
        },
        request: RequestLimits {
            max_tokens: 512,
            defaults,
        },
        max_body_bytes: s.max_body,
    };
    Server::start(engine, config, "127.0.0.1:0".parse().unwrap()).expect("server starts")
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of a server-sent-event body.
    fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
            .collect()
    }
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer before reading all of an oversized body and close: ignore the error.
    let _ = s.write_all(body);
    s
}

/// Reads a whole response (content-length or chunked).
fn read_reply(s: TcpStream) -> Reply {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .expect("status line")
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    read_reply(send(addr, method, path, headers, body))
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    call(addr, "POST", path, &[], body.to_string().as_bytes())
}

/// A metric's value from `/metrics` (a line `name value`).
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = String::from_utf8(call(addr, "GET", "/metrics", &[], b"").body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

/// Waits until `name` reads `want`; panics after `limit`.
fn wait_metric(addr: SocketAddr, name: &str, want: f64, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let v = metric(addr, name);
        if v == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{name} is {v}, not {want}, after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One request the way the tests send it, and the same request decoded alone by the engine.
#[derive(Clone)]
struct Case {
    prompt: &'static str,
    ar: bool,
    temperature: f32,
    seed: u64,
    max_tokens: usize,
}

impl Case {
    fn body(&self, stream: bool) -> Value {
        let mut b = json!({
            "model": "default",
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "stream": stream,
        });
        if self.ar {
            b["edgediff"] = json!({ "decoder": "ar" });
        }
        b
    }

    /// The engine alone: the text and token count the server must reproduce.
    fn solo(&self) -> (String, usize) {
        let e = engine();
        let mut r = e.request(Prompt::Text(self.prompt.into()));
        r.decoding = DecodeParams {
            max_new_tokens: self.max_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                seed: self.seed,
                ..Sampling::greedy()
            },
            ..e.default_decoding()
        };
        if self.ar {
            r.decoding.decoder = DecoderKind::Ar;
        }
        let out = e.generate(&r, &mut |_| {}).unwrap();
        (out.text, out.stats.new_tokens)
    }
}

fn cases() -> Vec<Case> {
    let prompts = [
        "int main(void) {",
        "def parse(text):",
        "The river",
        "fn main() {",
    ];
    let mut cases = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for (temperature, seed) in [(0.0, 0), (0.9, 7 + i as u64)] {
            cases.push(Case {
                prompt: p,
                ar: true,
                temperature,
                seed,
                max_tokens: 24,
            });
        }
    }
    // Block diffusion costs ~16 positions a pass on the CPU: fewer and shorter.
    for (p, (temperature, seed)) in prompts.iter().take(2).zip([(0.0, 0), (0.8, 3)]) {
        cases.push(Case {
            prompt: p,
            ar: false,
            temperature,
            seed,
            max_tokens: 10,
        });
    }
    cases
}

/// The text of a streamed completion, and its finish reason and usage.
fn streamed_text(r: &Reply) -> (String, String, Value) {
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["text"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.into();
            }
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    (text, finish, usage)
}

#[test]
fn concurrent_clients_get_exactly_the_tokens_of_solo_decoding() {
    let cases = cases();
    let solo: Vec<(String, usize)> = cases.iter().map(Case::solo).collect();
    // Its own engine: the batch metrics below would otherwise count the passes of other tests'
    // servers running at the same time on the shared one (most of them one sequence each).
    let srv = server_on(own_engine(), Setup::default());
    let addr = srv.addr();
    // Every case twice at once, streamed and not: 20 requests over 4 slots.
    let threads: Vec<_> = cases
        .iter()
        .cloned()
        .enumerate()
        .flat_map(|(i, c)| [(i, c.clone(), false), (i, c, true)])
        .map(|(i, c, stream)| {
            std::thread::spawn(move || {
                let mut body = c.body(stream);
                if stream {
                    body["stream_options"] = json!({ "include_usage": true });
                }
                let r = post(addr, "/v1/completions", &body);
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                let (text, usage) = if stream {
                    let (text, finish, usage) = streamed_text(&r);
                    assert!(finish == "length" || finish == "stop", "{finish}");
                    (text, usage)
                } else {
                    let v = r.json();
                    (
                        v["choices"][0]["text"].as_str().unwrap().to_string(),
                        v["usage"].clone(),
                    )
                };
                (i, stream, text, usage)
            })
        })
        .collect();
    for t in threads {
        let (i, stream, text, usage) = t.join().unwrap();
        let (want, tokens) = &solo[i];
        assert_eq!(
            &text, want,
            "case {i} (stream {stream}): server text differs from solo decoding"
        );
        assert_eq!(usage["completion_tokens"], *tokens, "case {i}");
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    }
    // The requests shared batched passes: fewer passes ran than the sequences asked for, many
    // held several sequences, and the mean held more than 1.5.
    let (sum, count) = (
        metric(addr, "edgediff_batch_size_sum"),
        metric(addr, "edgediff_batch_size_count"),
    );
    assert!(sum / count > 1.5, "mean batch size {}", sum / count);
    let alone = metric(addr, "edgediff_batch_size_bucket{le=\"1\"}");
    assert!(
        alone < count / 2.0,
        "{alone} of {count} batched passes held one sequence"
    );
    let passes = metric(addr, "edgediff_forward_passes_total");
    assert!(
        count < passes,
        "{count} batched passes for {passes} sequence passes"
    );
    assert!(metric(addr, "edgediff_batch_rows_sum") >= sum);
    assert_eq!(metric(addr, "edgediff_sequences_running"), 0.0);
    assert_eq!(metric(addr, "edgediff_kv_bytes_in_use"), 0.0);
    assert!(metric(addr, "edgediff_time_to_first_token_seconds_count") >= 20.0);
    srv.shutdown().unwrap();
}

#[test]
fn chat_completions_use_the_chat_template_and_stream_role_then_content() {
    let srv = server(Setup::default());
    let addr = srv.addr();
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]);
    let e = engine();
    let mut r = e.request(Prompt::Chat(vec![
        edgediff::tokenizer::ChatMessage::system("Be brief."),
        edgediff::tokenizer::ChatMessage::user("Write a loop."),
    ]));
    r.decoding.decoder = DecoderKind::Ar;
    r.decoding.max_new_tokens = 20;
    let want = e.generate(&r, &mut |_| {}).unwrap().text;
    let body = json!({"model": "m", "messages": messages, "max_tokens": 20, "edgediff": {"decoder": "ar"}});
    let whole = post(addr, "/v1/chat/completions", &body).json();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], "default");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["choices"][0]["message"]["content"], want.as_str());
    let mut body = body;
    body["stream"] = json!(true);
    let streamed = post(addr, "/v1/chat/completions", &body);
    let events = streamed.events();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(text, want);
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let srv = server(Setup::default());
    let addr = srv.addr();
    let case = Case {
        prompt: "int main(void) {",
        ar: true,
        temperature: 0.0,
        seed: 0,
        max_tokens: 40,
    };
    let (full, _) = case.solo();
    // A stop string from the middle of the unconstrained answer.
    let stop: String = full
        .chars()
        .skip(full.chars().count() / 2)
        .take(3)
        .collect();
    let want = &full[..full.find(&stop).unwrap()];
    let mut body = case.body(false);
    body["stop"] = json!([stop, "never-seen"]);
    let v = post(addr, "/v1/completions", &body).json();
    assert_eq!(v["choices"][0]["text"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let (text, finish, _) = streamed_text(&post(addr, "/v1/completions", &body));
    assert_eq!(text, want);
    assert_eq!(finish, "stop");
}

/// A streamed request long enough to still be running when the client leaves.
fn long_stream(addr: SocketAddr) -> TcpStream {
    let body = json!({"prompt": "int main(void) {", "max_tokens": 400, "stream": true, "edgediff": {"ignore_eos": true}});
    let s = send(
        addr,
        "POST",
        "/v1/completions",
        &[],
        body.to_string().as_bytes(),
    );
    // Wait for the first piece of text: the generation is running.
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended early");
        if line.starts_with("data: {") {
            return s;
        }
    }
}

#[test]
fn a_client_that_disconnects_frees_its_sequence_and_kv() {
    let srv = server(Setup {
        max_batch: 1,
        ..Setup::default()
    });
    let addr = srv.addr();
    let running = long_stream(addr);
    assert_eq!(metric(addr, "edgediff_sequences_running"), 1.0);
    assert!(metric(addr, "edgediff_kv_bytes_in_use") > 0.0);
    // A second request waits in the queue (max batch 1), then its client leaves too.
    let body = json!({"prompt": "fn main() {", "max_tokens": 16});
    let queued = send(
        addr,
        "POST",
        "/v1/completions",
        &[],
        body.to_string().as_bytes(),
    );
    wait_metric(addr, "edgediff_queue_depth", 1.0, Duration::from_secs(10));
    drop(queued);
    wait_metric(addr, "edgediff_queue_depth", 0.0, Duration::from_secs(10));
    assert_eq!(metric(addr, "edgediff_sequences_running"), 1.0);
    drop(running);
    // The stream's next write fails, the handle drops, the generation stops before its next pass.
    let took = wait_metric(
        addr,
        "edgediff_sequences_running",
        0.0,
        Duration::from_secs(10),
    );
    assert_eq!(metric(addr, "edgediff_kv_bytes_in_use"), 0.0);
    assert_eq!(metric(addr, "edgediff_generations_cancelled_total"), 2.0);
    eprintln!("the disconnected generation ended {took:?} after the client left");
    // The slot is free again.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2, "edgediff": {"decoder": "ar"}}),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn a_full_queue_is_429_with_retry_after_and_an_oversized_cache_is_400() {
    let srv = server(Setup {
        max_batch: 1,
        max_queue: 1,
        // 3 MiB holds ~510 positions of this model (6 KiB each): the long stream's 407 fit, a
        // request for the 512-token cap does not.
        kv_budget: 3 << 20,
        ..Setup::default()
    });
    let addr = srv.addr();
    let running = long_stream(addr);
    let body = json!({"prompt": "fn main() {", "max_tokens": 4, "edgediff": {"decoder": "ar"}});
    let queued = send(
        addr,
        "POST",
        "/v1/completions",
        &[],
        body.to_string().as_bytes(),
    );
    wait_metric(addr, "edgediff_queue_depth", 1.0, Duration::from_secs(10));
    let r = post(addr, "/v1/completions", &body);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 4000}),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "kv_budget_exceeded");
    drop(running);
    // The queued request runs once the slot frees, and completes.
    let r = read_reply(queued);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let srv = server(Setup {
        max_body: 4096,
        ..Setup::default()
    });
    let addr = srv.addr();
    let check = |method: &str, path: &str, body: &[u8], status: u16, needle: &str| {
        let r = call(addr, method, path, &[], body);
        assert_eq!(
            r.status,
            status,
            "{method} {path} {}: {}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {v}"));
        assert!(v["error"]["type"].is_string(), "{v}");
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    };
    let chat = "/v1/chat/completions";
    let comp = "/v1/completions";
    check("POST", chat, b"{not json", 400, "not a valid request");
    check("POST", chat, b"", 400, "not a valid request");
    check("POST", chat, b"[1,2]", 400, "not a valid request");
    check("POST", chat, br#"{"model":"m"}"#, 400, "messages");
    check(
        "POST",
        chat,
        br#"{"messages":[]}"#,
        400,
        "messages is empty",
    );
    check(
        "POST",
        chat,
        br#"{"messages":"hi"}"#,
        400,
        "not a valid request",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":"hi"}],"n":3}"#,
        400,
        "n = 3",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
        400,
        "image_url",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":"hi"}],"edgediff":{"decodr":"ar"}}"#,
        400,
        "decodr",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":"hi"}],"edgediff":{"decoder":"nope"}}"#,
        400,
        "nope",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":"hi"}],"temperature":-1}"#,
        400,
        "temperature",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":"hi"}],"top_p":0}"#,
        400,
        "top_p",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#,
        400,
        "max_tokens",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":"hi"}],"stop":["a","b","c","d","e"]}"#,
        400,
        "at most 4",
    );
    check(
        "POST",
        chat,
        br#"{"messages":[{"role":"user","content":"hi"}],"edgediff":{"block_size":0}}"#,
        400,
        "block_size",
    );
    check("POST", comp, br#"{"prompt":""}"#, 400, "empty");
    check("POST", comp, br#"{"prompt":[99999999]}"#, 400, "vocabulary");
    check("POST", comp, br#"{"prompt":["a","b"]}"#, 400, "2 texts");
    let big = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(8192));
    check("POST", comp, big.as_bytes(), 413, "too large");
    let long_prompt: Vec<u32> = vec![5; 5000];
    let body = json!({"prompt": long_prompt}).to_string();
    let srv_big = server(Setup::default());
    let r = call(srv_big.addr(), "POST", comp, &[], body.as_bytes());
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    check("GET", chat, b"", 405, "method");
    check("POST", "/v2/nothing", b"{}", 404, "no such endpoint");
    // Still serving.
    let r = post(
        addr,
        comp,
        &json!({"prompt": "x", "max_tokens": 2, "edgediff": {"decoder": "ar"}}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(metric(addr, "edgediff_sequences_running"), 0.0);
}

#[test]
fn a_missing_or_wrong_api_key_is_401() {
    let srv = server(Setup {
        api_key: Some("s3cret"),
        ..Setup::default()
    });
    let addr = srv.addr();
    let body = json!({"prompt": "x", "max_tokens": 2, "edgediff": {"decoder": "ar"}}).to_string();
    let r = call(addr, "POST", "/v1/completions", &[], body.as_bytes());
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = call(
        addr,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer s3cre")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 401);
    let r = call(
        addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer wrong")],
        b"",
    );
    assert_eq!(r.status, 401);
    let r = call(
        addr,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer s3cret")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    let r = call(
        addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    assert_eq!(r.json()["data"][0]["id"], "default");
    assert_eq!(call(addr, "GET", "/health", &[], b"").status, 200);
}

#[test]
fn a_slow_reader_gets_every_piece_and_does_not_hold_up_others() {
    let srv = server(Setup {
        max_batch: 2,
        ..Setup::default()
    });
    let addr = srv.addr();
    let slow = Case {
        prompt: "def parse(text):",
        ar: true,
        temperature: 0.0,
        seed: 0,
        max_tokens: 48,
    };
    let (want, _) = slow.solo();
    let s = send(
        addr,
        "POST",
        "/v1/completions",
        &[],
        slow.body(true).to_string().as_bytes(),
    );
    // The slow client reads 64 bytes at a time with pauses, in the background.
    let reader = std::thread::spawn(move || {
        let mut s = s;
        let mut raw = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            std::thread::sleep(Duration::from_millis(20));
        }
        raw
    });
    // Meanwhile another client is answered in full.
    let quick = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "fn main() {", "max_tokens": 8, "edgediff": {"decoder": "ar"}}),
    );
    assert_eq!(quick.status, 200);
    assert!(
        !reader.is_finished(),
        "the slow reader was done before a short request"
    );
    let raw = reader.join().unwrap();
    // De-chunk the slow reader's bytes the ordinary way.
    let text = String::from_utf8_lossy(&raw).into_owned();
    let body_start = text.find("\r\n\r\n").unwrap() + 4;
    let mut body = Vec::new();
    let mut rest = &raw[body_start..];
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let n =
            usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        body.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
        rest = &rest[eol + 4 + n..];
    }
    let reply = Reply {
        status: 200,
        headers: Vec::new(),
        body,
    };
    let (got, _, _) = streamed_text(&reply);
    assert_eq!(got, want);
}

#[test]
fn bad_serve_flags_are_one_line_errors_before_listening() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgediff"))
            .arg("serve")
            .args(["--backend", "cpu", "--port", "0"])
            .args(args)
            .env_remove("EDGEDIFF_API_KEY")
            .output()
            .unwrap();
        assert!(!out.status.success(), "serve {args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--max-batch", "0"]);
    assert!(err.contains("--max-batch 0"), "{err}");
    let err = run(&["--kv-memory", "lots"]);
    assert!(
        err.contains("--kv-memory lots") && err.contains("512MiB"),
        "{err}"
    );
    let err = run(&["--max-body", "big"]);
    assert!(err.contains("--max-body"), "{err}");
    let err = run(&["--host", "no such host.invalid"]);
    assert!(err.contains("--host"), "{err}");
    let err = run(&["--model", "/nonexistent/m.edm"]);
    assert!(err.contains("/nonexistent/m.edm"), "{err}");
    for e in ["--max-batch 0", "--kv-memory lots"] {
        let flag: Vec<&str> = e.split(' ').collect();
        assert_eq!(run(&flag).trim().lines().count(), 1, "{e}");
    }
}

#[test]
fn a_chat_completion_with_reason_runs_rsa_and_reports_its_votes() {
    let srv = server(Setup::default());
    let body = |reason: Value, extra: Value| {
        let mut b = json!({
            "messages": [{"role": "user", "content": "What is 2 + 3?"}],
            "max_tokens": 3, "seed": 3,
            "edgediff": {"decoder": "ar", "reason": reason},
        });
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    };
    let reason = json!({"n": 2, "k": 2, "rounds": 1, "tail_tokens": 8, "think_budget": 4,
                        "answer_regex": "(\\S+)\\s*$"});
    let r = post(
        srv.addr(),
        "/v1/chat/completions",
        &body(reason.clone(), json!({})),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    let ext = &v["edgediff"];
    assert_eq!(ext["traces"], 4);
    assert_eq!(ext["rounds"].as_array().unwrap().len(), 2);
    assert!(ext["peak_kv_bytes"].as_u64().unwrap() > 0);
    assert_eq!(ext["votes"], ext["rounds"][1]["votes"]);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // Seeded: the same request gives the same run.
    let again = post(
        srv.addr(),
        "/v1/chat/completions",
        &body(reason.clone(), json!({})),
    );
    assert_eq!(again.json()["edgediff"], v["edgediff"]);

    for (bad, extra, what) in [
        (json!({"n": 2, "k": 3}), json!({}), "k = 3"),
        (json!({"tail_tokens": 0}), json!({}), "tail_tokens"),
        (json!({"think_budget": 100000}), json!({}), "context"),
        (json!({"answer_regex": "("}), json!({}), "pattern"),
        (json!({"bogus": 1}), json!({}), "bogus"),
        (
            reason.clone(),
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            "one user turn",
        ),
    ] {
        let r = post(
            srv.addr(),
            "/v1/chat/completions",
            &body(bad.clone(), extra),
        );
        assert_eq!(r.status, 400, "{bad}: {}", String::from_utf8_lossy(&r.body));
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(what), "{bad}: {msg}");
    }
}

/// A reasoning chat request (the default model, AR, seeded).
fn reason_body(reason: Value, max_tokens: usize, stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "max_tokens": max_tokens, "seed": 5, "stream": stream,
        "stream_options": {"include_usage": true},
        "edgediff": {"decoder": "ar", "reason": reason},
    })
}

#[test]
fn a_streamed_reason_run_sends_each_rounds_events_in_order_then_the_answer() {
    let srv = server(Setup::default());
    let reason = json!({"n": 3, "k": 2, "rounds": 2, "tail_tokens": 8, "think_budget": 6,
                        "answer_regex": "(\\S+)\\s*$"});
    let r = post(
        srv.addr(),
        "/v1/chat/completions",
        &reason_body(reason.clone(), 4, true),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let data = r.events();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (events, answer): (Vec<&Value>, Vec<&Value>) = chunks
        .iter()
        .partition(|c| c["object"] == "edgediff.reason.event");
    // Every event comes before the answer's chunks.
    let first_answer = chunks
        .iter()
        .position(|c| c["object"] != "edgediff.reason.event")
        .unwrap();
    assert_eq!(first_answer, events.len());
    assert!(events.iter().all(|e| e["choices"] == json!([])));
    // Per round: round_started, then each trace starts before its text and ends after it, the
    // round ends after all of its traces, and the next round starts after that.
    let mut round = 0;
    let mut i = 0;
    let mut texts: Vec<Vec<String>> = Vec::new();
    while i < events.len() {
        let e = &events[i]["event"];
        assert_eq!(e["type"], "round_started", "{e}");
        assert_eq!(e["round"], round);
        assert_eq!(e["traces"], 3);
        i += 1;
        let mut started = [false; 3];
        let mut finished = [false; 3];
        let mut text = vec![String::new(); 3];
        loop {
            let e = &events[i]["event"];
            i += 1;
            assert_eq!(e["round"], round, "{e}");
            let t = e["trace"].as_u64().map(|t| t as usize);
            match e["type"].as_str().unwrap() {
                "trace_started" => {
                    let t = t.unwrap();
                    assert!(!started[t]);
                    started[t] = true;
                    let parents = e["parents"].as_array().unwrap().len();
                    assert_eq!(parents, if round == 0 { 0 } else { 2 }, "{e}");
                }
                "trace_text" => {
                    let t = t.unwrap();
                    assert!(started[t] && !finished[t], "{e}");
                    text[t].push_str(e["text"].as_str().unwrap());
                }
                "trace_finished" => {
                    let t = t.unwrap();
                    assert!(started[t] && !finished[t], "{e}");
                    finished[t] = true;
                }
                "round_done" => {
                    assert!(finished.iter().all(|&f| f), "{e}");
                    assert!(e["peak_kv_bytes"].as_u64().unwrap() > 0);
                    break;
                }
                other => panic!("unexpected event {other}: {e}"),
            }
        }
        texts.push(text);
        round += 1;
    }
    assert_eq!(round, 3, "rounds 0, 1, 2");
    // The answer: role + content, the end with the summary, the usage.
    assert_eq!(answer.len(), 3, "{answer:?}");
    assert!(answer
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let delta = &answer[0]["choices"][0]["delta"];
    assert_eq!(delta["role"], "assistant");
    let content = delta["content"].as_str().unwrap();
    assert!(
        texts[2].iter().any(|t| t == content),
        "the answer is a last-round trace's text: {content:?} vs {:?}",
        texts[2]
    );
    assert_eq!(answer[1]["choices"][0]["finish_reason"], "stop");
    let summary = &answer[1]["edgediff"];
    assert_eq!(summary["traces"], 9);
    assert_eq!(answer[2]["choices"], json!([]));
    assert!(answer[2]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // The same request unstreamed is the same run.
    let whole = post(
        srv.addr(),
        "/v1/chat/completions",
        &reason_body(reason, 4, false),
    );
    assert_eq!(whole.status, 200);
    let whole = whole.json();
    assert_eq!(&whole["edgediff"], summary);
    assert_eq!(whole["choices"][0]["message"]["content"], content);
    assert_eq!(whole["usage"], answer[2]["usage"]);
}

#[test]
fn reason_rounds_take_slots_and_kv_and_are_refused_when_they_cannot_fit() {
    // 1.5 MiB holds 256 positions of this model (6 KiB each). With β 4, 3 answer tokens and the
    // 7-token fallback marker, a round-0 trace takes ~24 positions and an aggregation trace ~96
    // (its prompt carries the instruction): one trace per round fits, three do not.
    let srv = server(Setup {
        max_batch: 4,
        kv_budget: 3 << 19,
        ..Setup::default()
    });
    let addr = srv.addr();
    let run = |n: usize| {
        json!({"n": n, "k": 1, "rounds": 1, "tail_tokens": 4, "think_budget": 4,
               "answer_regex": "(\\S+)\\s*$"})
    };
    let r = post(addr, "/v1/chat/completions", &reason_body(run(1), 3, false));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = post(addr, "/v1/chat/completions", &reason_body(run(3), 3, false));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["error"]["code"], "kv_budget_exceeded");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("3 traces"),
        "{e}"
    );
    let r = post(addr, "/v1/chat/completions", &reason_body(run(5), 3, false));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "max_batch_exceeded");
    assert_eq!(metric(addr, "edgediff_kv_bytes_in_use"), 0.0);
    assert_eq!(metric(addr, "edgediff_sequences_running"), 0.0);

    // Two slots, one held by a request: a run of 2 traces waits in the queue (counted in its
    // depth), the next finds the queue full (429); when the slot frees, the run is admitted round
    // by round and completes, its passes counted with everyone's.
    let srv = server(Setup {
        max_batch: 2,
        max_queue: 1,
        ..Setup::default()
    });
    let addr = srv.addr();
    let running = long_stream(addr);
    let queued = send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        reason_body(run(2), 3, false).to_string().as_bytes(),
    );
    wait_metric(addr, "edgediff_queue_depth", 1.0, Duration::from_secs(10));
    assert_eq!(metric(addr, "edgediff_sequences_running"), 1.0);
    let r = post(addr, "/v1/chat/completions", &reason_body(run(2), 3, false));
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(running);
    let r = read_reply(queued);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["edgediff"]["traces"], 4);
    wait_metric(
        addr,
        "edgediff_sequences_running",
        0.0,
        Duration::from_secs(10),
    );
    assert_eq!(metric(addr, "edgediff_kv_bytes_in_use"), 0.0);
    let passes = v["edgediff"]["forward_passes"].as_f64().unwrap();
    assert!(metric(addr, "edgediff_forward_passes_total") >= passes);
    let tokens = v["usage"]["completion_tokens"].as_f64().unwrap();
    assert!(metric(addr, "edgediff_completion_tokens_total") >= tokens);
}

#[test]
fn a_reason_client_that_disconnects_cancels_the_run() {
    let srv = server(Setup::default());
    let addr = srv.addr();
    // Long enough to be mid-run when the client leaves: 4 rounds of 2 traces of up to 330 tokens.
    let reason = json!({"n": 2, "k": 2, "rounds": 3, "tail_tokens": 64, "think_budget": 200});
    let s = send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        reason_body(reason, 128, true).to_string().as_bytes(),
    );
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    let mut texts = 0;
    while texts < 3 {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended early");
        texts += usize::from(line.contains("\"trace_text\""));
    }
    // Round 0's two traces hold two slots and their KV.
    wait_metric(
        addr,
        "edgediff_sequences_running",
        2.0,
        Duration::from_secs(10),
    );
    assert!(metric(addr, "edgediff_kv_bytes_in_use") > 0.0);
    drop(r);
    drop(s);
    // Counted when the run has returned, its leases (slots, KV) given back.
    let took = wait_metric(
        addr,
        "edgediff_generations_cancelled_total",
        1.0,
        Duration::from_secs(20),
    );
    assert_eq!(metric(addr, "edgediff_sequences_running"), 0.0);
    assert_eq!(metric(addr, "edgediff_kv_bytes_in_use"), 0.0);
    // Cancelled, not finished: no reasoning run's tokens were counted.
    assert_eq!(metric(addr, "edgediff_completion_tokens_total"), 0.0);
    eprintln!("the disconnected run ended {took:?} after the client left");

    // A run whose round waits in the queue leaves it when its client goes, counted once.
    let srv = server(Setup {
        max_batch: 2,
        ..Setup::default()
    });
    let addr = srv.addr();
    let running = long_stream(addr);
    let reason = json!({"n": 2, "k": 1, "rounds": 1, "tail_tokens": 4, "think_budget": 4});
    let queued = send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        reason_body(reason, 3, false).to_string().as_bytes(),
    );
    wait_metric(addr, "edgediff_queue_depth", 1.0, Duration::from_secs(10));
    drop(queued);
    wait_metric(addr, "edgediff_queue_depth", 0.0, Duration::from_secs(10));
    wait_metric(
        addr,
        "edgediff_generations_cancelled_total",
        1.0,
        Duration::from_secs(10),
    );
    // Still one: the withdrawn round is not counted apart from its run.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(addr, "edgediff_generations_cancelled_total"), 1.0);
    assert_eq!(metric(addr, "edgediff_sequences_running"), 1.0);
    drop(running);
}
