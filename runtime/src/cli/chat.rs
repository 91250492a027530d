//! `edgediff chat`: a multi-turn conversation through the model's chat template. Each stdin line is
//! a user turn; the reply streams to stdout. `/reset` forgets the conversation; EOF ends it.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;

use super::generate::{pager_report, stats_report, DecodingArgs, ModelArgs};
use crate::decode::DecodeError;
use crate::engine::{EngineError, Event, Prompt};
use crate::tokenizer::ChatMessage;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// A system message opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Print generation statistics to stderr after each reply.
    #[arg(long)]
    pub stats: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let engine = a.model.load(&a.decoding)?;
    let params = a.decoding.params(&engine);
    let interactive = std::io::stdin().is_terminal();
    let opening: Vec<ChatMessage> = a.system.iter().map(ChatMessage::system).collect();
    let mut history = opening.clone();
    if interactive {
        eprintln!(
            "edgediff chat — {} on {}; /reset to start over, Ctrl-D to quit",
            params.decoder.label(),
            engine.backend_name()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/reset" {
            history = opening.clone();
            continue;
        }
        history.push(ChatMessage::user(line));
        let mut request = engine.request(Prompt::Chat(history.clone()));
        request.decoding = params.clone();
        let mut stdout = std::io::stdout().lock();
        let result = engine.generate(&request, &mut |e| {
            if let Event::Text(t) = e {
                let _ = stdout.write_all(t.as_bytes());
                let _ = stdout.flush();
            }
        });
        writeln!(stdout)?;
        match result {
            Ok(out) => {
                if a.stats {
                    eprintln!("{}", stats_report(&request.decoding, &out));
                    if let Some(p) = engine.expert_stats() {
                        eprintln!("{}", pager_report(&p));
                    }
                }
                history.push(ChatMessage::assistant(out.text));
            }
            Err(EngineError::Decode(e @ DecodeError::ContextTooLong { .. })) => {
                history.pop();
                eprintln!("error: {e}; /reset to start a new conversation");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
