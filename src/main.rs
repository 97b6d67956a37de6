//! The `inference-core` binary: parse flags and config, start logging, run
//! the server, map failures to exit codes (1: start-up failed, 2: bad flags
//! or config, 70: the engine stalled).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use inference_core::config::{Cli, Config};
use inference_core::{app, logging};

fn main() -> ExitCode {
    let cli = Cli::from_env();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("inference-core: error: {e}");
            return ExitCode::from(2);
        }
    };
    let _logger = match logging::init(&config.log) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("inference-core: error: cannot start logging: {e}");
            return ExitCode::from(2);
        }
    };
    match app::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
