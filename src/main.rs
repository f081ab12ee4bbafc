//! The `iampool` binary: load the configuration, set up logging, run until told to stop.

use std::process::ExitCode;

use iampool::app::{ConfigSource, LogReloader};
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
    let threads = loaded.config.as_ref().map_or(0, |c| c.worker_threads);
    let runtime = match runtime(threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("iampool: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match loaded.command {
        Command::CheckConfig => {
            for warning in &loaded.warnings {
                eprintln!("iampool: warning: {warning}");
            }
            print!("{}", loaded.render_redacted());
            ExitCode::SUCCESS
        }
        Command::Token(args) => {
            let result = runtime.block_on(iampool::iam::command::token_command(&args));
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
        Command::Inject(args) => inject(&args),
        Command::ImportPgbouncer(args) => ExitCode::from(iampool::config::import::run(&args)),
        Command::Run => {
            let config = loaded.config.expect("run has a configuration");
            let log_reloader = init_logging(&config.log_level, config.log_format);
            // The environment does not change while iampool runs, so a reload would only
            // repeat these: they are logged once, at start.
            for warning in &loaded.warnings {
                warn!(source = %warning.source, fix = %warning.fix, "{}", warning.message);
            }
            // RELOAD and SIGHUP re-read the same file, environment and flags.
            let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
            let source: ConfigSource = Box::new(move || {
                let loaded =
                    Config::load(args.clone(), std::env::vars()).map_err(|e| e.to_string())?;
                loaded.config.ok_or_else(|| "no configuration".to_owned())
            });
            runtime.block_on(run(config, source, log_reloader))
        }
    }
}

/// `iampool inject`: the injected YAML on stdout, notes and errors on stderr.
fn inject(args: &iampool::config::InjectArgs) -> ExitCode {
    use std::io::{Read, Write};
    let mut input = String::new();
    let read = if args.file == "-" {
        std::io::stdin().read_to_string(&mut input).map(drop)
    } else {
        std::fs::read_to_string(&args.file).map(|text| input = text)
    };
    if let Err(e) = read {
        eprintln!("iampool inject: cannot read {}: {e}", args.file);
        return ExitCode::from(2);
    }
    match iampool::inject::inject(&input, &args.options) {
        Ok(injected) => {
            for note in &injected.notes {
                eprintln!("iampool inject: {note}");
            }
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(injected.output.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("iampool inject: cannot write the output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("iampool inject: {e}");
            ExitCode::from(2)
        }
    }
}

/// One thread: tokio's current-thread runtime, where a client and its server wake each
/// other without crossing threads and no scheduler statistics are kept. Otherwise the
/// work-stealing scheduler with `threads` workers (0: one per core).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

fn init_logging(level: &str, format: LogFormat) -> LogReloader {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colour only for a person at a terminal, never in a file or a log collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(not_secret_bearing));
    match format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    Box::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// Dependencies whose events carry secrets whatever the level asked for: aws-sigv4 traces
/// the canonical request of every signing, session token included. They never reach the
/// log, so no log_level can print a secret.
const SECRET_BEARING_TARGETS: [&str; 1] = ["aws_sigv4"];

fn not_secret_bearing(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    !SECRET_BEARING_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

async fn run(config: Config, source: ConfigSource, log_reloader: LogReloader) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let running = match iampool::app::start(config).await {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    running.shared().set_config_source(source);
    running.shared().set_log_reloader(log_reloader);
    info!(version = env!("CARGO_PKG_VERSION"), "iampool ready");

    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let mut shutdown = running.shared().shutdown_signal();
    loop {
        tokio::select! {
            _ = term.recv() => {
                let delay = running.shared().config().min_sigterm_delay;
                if delay.is_zero() {
                    info!("SIGTERM: draining");
                    break;
                }
                // Kubernetes removes the pod from Services and the application finishes its
                // work meanwhile: keep serving, but say not ready.
                info!(?delay, "SIGTERM: still serving for min_sigterm_delay, then draining");
                running.shared().begin_terminating();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => info!("min_sigterm_delay over: draining"),
                    _ = term.recv() => info!("second SIGTERM: draining now"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT: draining now"),
                    _ = shutdown.changed() => info!("SHUTDOWN: draining now"),
                }
                break;
            }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: draining"); break }
            // Admin SHUTDOWN.
            _ = shutdown.changed() => { info!("SHUTDOWN: draining"); break }
            _ = hup.recv() => {
                if let Err(e) = running.shared().reload() {
                    warn!(error = %e, "SIGHUP: reload failed; keeping the current configuration");
                }
            }
        }
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
