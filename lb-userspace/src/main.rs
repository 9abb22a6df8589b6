use anyhow::Result;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use tracing_subscriber::EnvFilter;
use xlb::{
    cli::{Cli, Command, RunArgs, StatusArgs},
    dataplane::Dataplane,
    status,
};

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Status(args) => status_cmd(args),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let mut dp = Dataplane::load(&args.pin_path)?;
    for iface in &args.ifaces {
        dp.attach(iface, args.xdp_mode)?;
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!(pin_path = %args.pin_path.display(), "xlb running");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: detaching"),
        _ = int.recv() => info!("SIGINT: detaching"),
    }
    drop(dp);
    info!("detached");
    Ok(())
}

fn status_cmd(args: StatusArgs) -> Result<()> {
    let st = status::read(&args.pin_path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", status::render_text(&st));
    }
    Ok(())
}
