//! The `iampool` binary: load the configuration, set up logging, run until told to stop.

use std::process::ExitCode;

use iampool::config::{Command, Config, LogFormat};
use tracing::{error, info, warn};

fn main() -> ExitCode {
    let loaded = match Config::load(std::env::args_os(), std::env::vars()) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("iampool: invalid configuration:\n{errors}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("iampool: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match loaded.command {
        Command::CheckConfig => {
            print!("{}", loaded.render_redacted());
            ExitCode::SUCCESS
        }
        Command::Token(args) => {
            let result = runtime.block_on(iampool::iam::command::token_command(
                &args.host,
                args.port,
                &args.user,
                args.region.as_deref(),
                args.signing_time.as_deref(),
            ));
            match result {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("iampool token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => {
            let config = loaded.config.expect("run has a configuration");
            init_logging(&config.log_level, config.log_format);
            runtime.block_on(run(config))
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(config: Config) -> ExitCode {
    let running = match iampool::app::start(config).await {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    info!(version = env!("CARGO_PKG_VERSION"), "iampool ready");

    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        error!("cannot install the SIGTERM handler");
        return ExitCode::FAILURE;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
    }
    // A second signal exits at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        warn!("second signal: exiting now");
        std::process::exit(1);
    });
    if running.shutdown().await {
        info!("all clients gone; bye");
    } else {
        warn!("shutdown_timeout reached with clients still connected; exiting");
    }
    ExitCode::SUCCESS
}
