//! The CPU collective's all-reduce between 2 local processes (the rank processes are this binary, started
//! with torchrun's variables on a free loopback port): seconds, algorithm bandwidth (buffer bytes / time) and
//! bus bandwidth (2·(W−1)/W · bytes / time, what each rank sends), against a plain copy of the same buffer in
//! the same process. Default size: a 0.6B-parameter f32 gradient.
//!
//! `cargo bench --profile dev --bench collective [-- ELEMENTS]`. Never fails on speed.

use std::process::Command;
use std::time::{Duration, Instant};

use sana_sprint::dist::{tcp::TcpRing, LaunchEnv};

const WORLD: usize = 2;

fn main() {
    let elements: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(600_000_000);
    match LaunchEnv::from_env().expect("launcher variables") {
        Some(env) => rank_main(&env, elements),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let exe = std::env::current_exe().unwrap();
            let children: Vec<_> = (0..WORLD)
                .map(|rank| {
                    Command::new(&exe)
                        .arg(elements.to_string())
                        .env("RANK", rank.to_string())
                        .env("WORLD_SIZE", WORLD.to_string())
                        .env("LOCAL_RANK", rank.to_string())
                        .env("LOCAL_WORLD_SIZE", WORLD.to_string())
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", port.to_string())
                        .spawn()
                        .unwrap()
                })
                .collect();
            for mut c in children {
                assert!(c.wait().unwrap().success(), "a rank failed");
            }
        }
    }
}

fn rank_main(env: &LaunchEnv, elements: usize) {
    let mut ring = TcpRing::rendezvous(env, Duration::from_secs(120)).unwrap();
    let mut buf: Vec<f32> = (0..elements).map(|i| (i % 1024) as f32).collect();
    let bytes = (elements * 4) as f64;
    ring.barrier().unwrap();
    let t = Instant::now();
    ring.all_reduce_sum(&mut buf).unwrap();
    let reduce = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let copy = buf.clone();
    let copy_s = t.elapsed().as_secs_f64();
    std::hint::black_box(&copy);
    ring.barrier().unwrap();
    if env.rank == 0 {
        let w = env.world_size as f64;
        println!(
            "all-reduce of {elements} f32 ({:.2} GB) between {} local processes: {reduce:.2} s, algorithm bandwidth \
             {:.2} GB/s, bus bandwidth {:.2} GB/s; plain copy of the buffer: {copy_s:.3} s ({:.1} GB/s)",
            bytes / 1e9,
            env.world_size,
            bytes / reduce / 1e9,
            2.0 * (w - 1.0) / w * bytes / reduce / 1e9,
            bytes / copy_s / 1e9
        );
    }
}
