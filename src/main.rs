//! The `call-notifier` binary: flags in, the library out.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use tracing_subscriber::EnvFilter;

use call_notifier::commands::{self, calls, devices, push_test};
use call_notifier::config::{
    AppAdd, AppCommand, Cli, Command, Config, DeviceCommand, LogFormat, PushCommand,
};
use call_notifier::store::{self, App, Credentials, Platform};
use call_notifier::Server;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("CALL_NOTIFIER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs the command; its exit status, or the error that stopped it (exit 1).
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await?,
        Command::Migrate => {
            store::migrate(&config.database_url).await?;
            println!("migrations applied");
        }
        Command::App(command) => app(config, *command).await?,
        Command::Push(PushCommand::Test(test)) => {
            let store = commands::open_store(&config).await?;
            let finding = push_test::run(store, &config, &test).await?;
            return Ok(ExitCode::from(finding.exit_code()));
        }
        Command::Device(command) => {
            let store = commands::open_store(&config).await?;
            match command {
                DeviceCommand::List { sip_user_id, json } => {
                    devices::list(store.as_ref(), sip_user_id, json).await?
                }
                DeviceCommand::Remove { sip_user_id, token } => {
                    devices::remove(store.as_ref(), sip_user_id, token.as_deref()).await?
                }
            }
        }
        Command::Calls(query) => {
            let store = commands::open_store(&config).await?;
            calls::list(store.as_ref(), &query).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let running = Server::new(config).start().await?;
    running.run_until_signalled(shutdown_signals()?).await;
    tracing::info!("stopped");
    Ok(())
}

/// Every Ctrl-C and SIGTERM, as a stream: the first drains, the second aborts.
fn shutdown_signals() -> anyhow::Result<impl futures_util::Stream<Item = ()> + Unpin> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            #[cfg(unix)]
            let term = term.recv();
            #[cfg(not(unix))]
            let term = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    Ok(Box::pin(futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
    )))
}

async fn app(config: Config, command: AppCommand) -> anyhow::Result<()> {
    let store = commands::open_store(&config).await?;
    match command {
        AppCommand::Add(add) => {
            let app = App {
                platform: add.platform,
                app_id: add.app_id.clone(),
                credentials: credentials(&add)?,
            };
            let created = store.put_app(&app).await?;
            println!(
                "{} app {} {}{}",
                if created { "added" } else { "updated" },
                app.platform,
                app.app_id,
                if app.credentials.is_none() {
                    " (no credentials: pushes are only logged)"
                } else {
                    ""
                }
            );
        }
        AppCommand::List => {
            for app in store.apps().await? {
                let credentials = match &app.credentials {
                    None => "log-only".to_owned(),
                    Some(c) => serde_json::to_string(c)?,
                };
                println!("{}\t{}\t{}", app.platform, app.app_id, credentials);
            }
        }
        AppCommand::Remove { platform, app_id } => {
            if !store.remove_app(platform, &app_id).await? {
                bail!("no app {app_id} for {platform}");
            }
            println!("removed app {platform} {app_id}");
        }
    }
    Ok(())
}

/// The credentials `app add` was given, checked against the platform.
fn credentials(add: &AppAdd) -> anyhow::Result<Option<Credentials>> {
    let apns_token =
        add.apns_key.is_some() || add.apns_key_id.is_some() || add.apns_team_id.is_some();
    let apns_cert = add.apns_cert.is_some()
        || add.apns_cert_password_env.is_some()
        || add.apns_cert_password_file.is_some();
    let fcm = add.fcm_service_account.is_some();
    match add.platform {
        Platform::Apns if fcm => bail!("--fcm-service-account is for android and gcm apps"),
        Platform::Android | Platform::Gcm
            if apns_token || apns_cert || add.apns_topic.is_some() =>
        {
            bail!("--apns-* flags are for apns apps")
        }
        _ => {}
    }
    if apns_token && apns_cert {
        bail!("give either --apns-key (token auth) or --apns-cert (certificate auth), not both");
    }
    if apns_token {
        return Ok(Some(Credentials::ApnsToken {
            key_path: absolute(
                add.apns_key
                    .clone()
                    .context("--apns-key is required for token auth")?,
            )?,
            key_id: add
                .apns_key_id
                .clone()
                .context("--apns-key-id is required for token auth")?,
            team_id: add
                .apns_team_id
                .clone()
                .context("--apns-team-id is required for token auth")?,
            topic: add.apns_topic.clone(),
        }));
    }
    if apns_cert {
        if add.apns_cert_password_env.is_some() && add.apns_cert_password_file.is_some() {
            bail!("give either --apns-cert-password-env or --apns-cert-password-file, not both");
        }
        return Ok(Some(Credentials::ApnsCertificate {
            cert_path: absolute(
                add.apns_cert
                    .clone()
                    .context("--apns-cert is required for certificate auth")?,
            )?,
            password_env: add.apns_cert_password_env.clone(),
            password_file: add
                .apns_cert_password_file
                .clone()
                .map(absolute)
                .transpose()?,
            topic: add.apns_topic.clone(),
        }));
    }
    if let Some(path) = &add.fcm_service_account {
        return Ok(Some(Credentials::Fcm {
            service_account_path: absolute(path.clone())?,
        }));
    }
    Ok(None)
}

/// Credentials paths are stored absolute: the server may run from another directory.
fn absolute(path: std::path::PathBuf) -> anyhow::Result<std::path::PathBuf> {
    std::path::absolute(&path).with_context(|| format!("bad path {}", path.display()))
}
