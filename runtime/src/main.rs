use clap::Parser;

fn main() {
    let cli = edgediff::cli::Cli::parse();
    if let Err(e) = edgediff::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
