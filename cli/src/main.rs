//! The `zcrx` command.

mod backend;
mod bench;
mod bench_vfio;
mod bench_vhost;
mod demo;
mod frames;
mod opts;
mod progress;
mod receive;
mod rx;
mod sender;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Zero-copy receive in the io_uring zcrx model, in userspace.
#[derive(Parser, Debug)]
#[command(name = "zcrx", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Stream verified data over loopback into a NODEV ifq and report (no NIC, no VM, no setup).
    Demo(demo::DemoArgs),
    /// Receive from a real peer and print stats.
    Rx(rx::RxArgs),
    /// Run our vhost-user-net backend (a software NIC): gen, sink, reflect or tap.
    Backend(backend::BackendArgs),
    /// On the host: boot a QEMU guest with a vfio-bound virtio-net NIC and receive zero-copy
    /// in it over VFIO (needs ci/install-vm.sh).
    Vm(vm::VmArgs),
    /// Benchmarks, each against its baselines in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::Rx(a) => rx::run(a),
        Cmd::Bench(b) => bench::run(b),
        Cmd::Backend(a) => backend::run(a),
        Cmd::Vm(a) => vm::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zcrx: {e}");
            ExitCode::FAILURE
        }
    }
}
