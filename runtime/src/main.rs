use clap::Parser;

fn main() {
    #[cfg(unix)]
    // SAFETY: restoring the default SIGPIPE disposition before any thread starts, so that
    // `edgediff forward | head` ends quietly like other Unix tools instead of panicking on EPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = edgediff::cli::Cli::parse();
    if let Err(e) = edgediff::cli::run(cli) {
        eprintln!("error: {}", edgediff::cli::report::error_line(&e));
        std::process::exit(1);
    }
}
