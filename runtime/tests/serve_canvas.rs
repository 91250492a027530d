//! `edgediff serve` with a DiffusionGemma model (issue 18): completions decode with the canvas
//! decoder by default and give the text the engine gives for the same settings, streamed or not;
//! the canvas knobs (`steps`, `gamma`) reach the sampler; another decoder is a 400 naming the one
//! the model decodes with.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use edgediff::decode::DecoderKind;
use edgediff::engine::{BackendChoice, EngineConfig, LoadedEngine, Prompt};
use edgediff::format::DType;
use edgediff::model::Architecture;
use edgediff::serve::{Limits, RequestLimits, ServeConfig, Server};
use serde_json::{json, Value};

/// POSTs `body` and returns (status, body); chunked bodies are joined.
fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        chunked |=
            line.to_ascii_lowercase().starts_with("transfer-encoding") && line.contains("chunked");
    }
    let mut out = Vec::new();
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
            out.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut out).unwrap();
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn the_server_decodes_a_diffusion_gemma_model_with_the_canvas_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dg.edm");
    let spec = edgediff::synth::SynthSpec {
        block_size: 5,
        seed: 9,
        ..edgediff::synth::SynthSpec::tiny(Architecture::DiffusionGemma)
    };
    edgediff::synth::write_edm(
        &edgediff::synth::build(&spec).unwrap(),
        &path,
        DType::F32,
        &|_, _| {},
    )
    .unwrap();
    let engine = Arc::new(
        LoadedEngine::load(
            &path,
            &EngineConfig {
                backend: BackendChoice::Cpu,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let defaults = engine.default_decoding();
    assert!(matches!(defaults.decoder, DecoderKind::Canvas(_)));
    let server = Server::start(
        engine.clone(),
        ServeConfig {
            model_id: "dg".into(),
            api_key: None,
            limits: Limits {
                max_batch: 2,
                kv_budget: 1 << 30,
                max_queue: 8,
            },
            request: RequestLimits {
                max_tokens: 64,
                defaults: defaults.clone(),
            },
            max_body_bytes: 64 << 10,
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.addr();

    // What the engine gives for the same request: 7 tokens (two canvases of 5), 4 steps each.
    let mut request = engine.request(Prompt::Text("hello".into()));
    request.decoding = defaults;
    let DecoderKind::Canvas(o) = &mut request.decoding.decoder else {
        unreachable!()
    };
    o.steps = 4;
    request.decoding.max_new_tokens = 7;
    request.decoding.sampling.seed = 3;
    request.decoding.ignore_eos = true;
    let want = engine.generate(&request, &mut |_| {}).unwrap();
    assert_eq!(want.tokens.len(), 7);

    let body = json!({"prompt": "hello", "max_tokens": 7, "seed": 3,
                      "edgediff": {"steps": 4, "ignore_eos": true}});
    let (status, text) = post(addr, "/v1/completions", &body);
    assert_eq!(status, 200, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reply["choices"][0]["text"], want.text.as_str());
    assert_eq!(reply["usage"]["completion_tokens"], 7);

    // Streamed: the deltas join to the same text.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, sse) = post(addr, "/v1/completions", &streamed);
    assert_eq!(status, 200, "{sse}");
    let joined: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["text"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(joined, want.text);

    // The knobs reach the sampler: other steps, another text (same seed).
    let mut fewer = body.clone();
    fewer["edgediff"]["steps"] = json!(1);
    fewer["edgediff"]["gamma"] = json!(5.0);
    let (status, text) = post(addr, "/v1/completions", &fewer);
    assert_eq!(status, 200, "{text}");
    let other: Value = serde_json::from_str(&text).unwrap();
    assert_ne!(other["choices"][0]["text"], want.text.as_str());

    // Another decoder is a 400 that names the canvas decoder.
    let mut block = body.clone();
    block["edgediff"]["decoder"] = json!("block");
    let (status, text) = post(addr, "/v1/completions", &block);
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("cannot run a diffusion_gemma model") && text.contains("canvas"),
        "{text}"
    );
    server.shutdown().unwrap();
}
