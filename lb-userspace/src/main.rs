use anyhow::{Context, Result};
use clap::Parser;
use tracing_subscriber::EnvFilter;
use xlb::{
    cli::{Cli, Command, MaglevArgs, StatusArgs},
    maglev, status,
};

fn main() -> std::process::ExitCode {
    // Two malloc arenas, not one per thread: the agent's large allocations (a reload's
    // 100,000 backends) are made on whichever runtime thread runs the loop, and memory
    // freed in one arena is not reused by another (the peak grew with every reload).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets a tunable of the allocator, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // Errors are for people: one line per cause, no backtrace.
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into a log file or journald.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    match Cli::parse().command {
        Command::Run(args) => xlb::agent::run(args.options()).await,
        Command::Status(args) => status_cmd(args).await,
        Command::Maglev(args) => maglev_cmd(args),
        Command::Detach(args) => xlb::uninstall::detach_node(&args.pin_path, args.force).await,
        Command::Uninstall(args) => xlb::uninstall::run(args).await,
        Command::Drain(args) => {
            xlb::announce::set_drained(&args.pin_path, true)?;
            xlb::outln!("drained: the agent withdraws every VIP within a second; established flows keep being forwarded");
            Ok(())
        }
        Command::Undrain(args) => {
            xlb::announce::set_drained(&args.pin_path, false)?;
            xlb::outln!("undrained: the agent announces again within a second");
            Ok(())
        }
        Command::CheckConfig(args) => {
            let cfg = xlb::config::Config::load_limited(&args.file, args.max_config_bytes)?;
            cfg.desired()
                .check_capacity(args.max_services, args.max_backends)
                .with_context(|| format!("{}: does not fit the maps", args.file.display()))?;
            let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
            xlb::outln!(
                "{}: ok ({} services, {backends} backends)",
                args.file.display(),
                cfg.services.len()
            );
            Ok(())
        }
    }
}

async fn status_cmd(args: StatusArgs) -> Result<()> {
    let st = match status::read(&args.pin_path).await {
        Ok(st) => st,
        // A script reading --json gets JSON even when there is nothing to read.
        Err(e) if args.json => {
            xlb::outln!("{}", serde_json::json!({"error": format!("{e:#}")}));
            std::process::exit(1);
        }
        Err(e) => return Err(e),
    };
    if args.json {
        xlb::outln!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        xlb::out!("{}", status::render_text(&st));
    }
    Ok(())
}

fn maglev_cmd(args: MaglevArgs) -> Result<()> {
    let table = maglev::build(&args.backends, args.table_size)?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Backend {
            address: String,
            weight: u32,
        }
        #[derive(serde::Serialize)]
        struct Out {
            table_size: u32,
            backends: Vec<Backend>,
            table: Vec<u32>,
        }
        let backends = args
            .backends
            .iter()
            .map(|b| Backend {
                address: b.addr.to_string(),
                weight: b.weight,
            })
            .collect();
        let out = Out {
            table_size: args.table_size,
            backends,
            table,
        };
        xlb::outln!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let counts = maglev::slot_counts(&table, args.backends.len());
    let active: Vec<_> = counts
        .iter()
        .zip(&args.backends)
        .filter(|(_, b)| b.weight > 0)
        .collect();
    let total_weight: u64 = active.iter().map(|(_, b)| b.weight as u64).sum();
    xlb::outln!(
        "Maglev table: M={} slots, {} backends ({} active)",
        args.table_size,
        args.backends.len(),
        active.len()
    );
    xlb::outln!(
        "{:<44} {:>6} {:>8} {:>8} {:>9}",
        "backend",
        "weight",
        "slots",
        "share",
        "vs ideal"
    );
    let mut worst: f64 = 0.0;
    for (b, &c) in args.backends.iter().zip(&counts) {
        let share = c as f64 / args.table_size as f64;
        let ideal = b.weight as f64 / total_weight as f64;
        let ratio = if ideal > 0.0 { share / ideal } else { 0.0 };
        worst = worst.max(ratio);
        xlb::outln!(
            "{:<44} {:>6} {:>8} {:>7.3}% {:>8.4}x",
            b.addr.to_string(),
            b.weight,
            c,
            share * 100.0,
            ratio
        );
    }
    xlb::outln!("max/average share (weighted): {worst:.4}");
    Ok(())
}
