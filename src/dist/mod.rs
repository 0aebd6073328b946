//! Several processes training one model (data parallel): how a run learns its place from the launcher
//! (torchrun or Slurm), and the collectives between the ranks.
//!
//! Nothing here starts processes or schedules anything: torchrun or Slurm start one process per GPU and say who
//! is who through environment variables ([`LaunchEnv`]). The ranks then meet at `MASTER_ADDR:MASTER_PORT`
//! (rank 0 listens there) and form a [`group::ProcessGroup`]: [`tcp::TcpRing`], a small ring all-reduce over TCP
//! for CPU runs, tests, barriers and host values (as PyTorch keeps gloo beside NCCL), and NCCL for the gradients
//! of GPU runs ([`nccl`], the `nccl` feature).

pub mod group; // the process group: the TCP ring plus, on GPUs, NCCL; bucketed gradient averaging
#[cfg(feature = "nccl")]
pub mod nccl; // NCCL on candle's CUDA stream, unique id over the ring, watchdog
pub mod tcp; // the CPU collective: rendezvous at MASTER_ADDR:MASTER_PORT, ring all-reduce, barrier
pub mod watchdog; // ends a rank whose NCCL wait outlives the timeout

use std::time::Duration;

use crate::{Error, Result};

/// Environment variable with the seconds any wait between ranks may take before it fails (default 300).
pub const TIMEOUT_ENV: &str = "SANA_SPRINT_DIST_TIMEOUT";

/// The wait limit of [`TIMEOUT_ENV`].
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var(TIMEOUT_ENV) {
        Err(_) => Ok(Duration::from_secs(300)),
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::Arg(format!(
                    "{TIMEOUT_ENV}={v:?}: expected a positive number of seconds"
                ))
            }),
    }
}

/// Which launcher's variables the run found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Torchrun,
    Slurm,
}

/// This process's place in a multi-process run, as the launcher describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    /// 0..world_size; rank 0 writes every file.
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes of this node: `--device cuda` means `cuda:local_rank`.
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Where rank 0 listens for the others.
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchEnv {
    /// From this process's environment; `None` for a plain single-process run (no launcher variables).
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// From a variable lookup (the environment, or a map in tests).
    ///
    /// torchrun sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`.
    /// Under Slurm (`srun`), `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` and `SLURM_STEP_TASKS_PER_NODE`
    /// give the ranks; rank 0 runs on the first host of `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`), which
    /// `MASTER_ADDR` overrides; the port is `MASTER_PORT`, else 20000 + `SLURM_JOB_ID` mod 20000, so that two jobs
    /// sharing a node do not collide. torchrun's variables win when both are present (torchrun inside a Slurm
    /// allocation).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        let num = |name: &str| -> Result<Option<usize>> {
            get(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Arg(format!(
                            "{name}={v:?} is not a number (set by the launcher?)"
                        ))
                    })
                })
                .transpose()
        };
        let need = |name: &str, launcher: &str| -> Result<String> {
            get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                Error::Arg(format!(
                    "{launcher} variables found but {name} is not set: start the run with torchrun or srun, \
                     or unset RANK / WORLD_SIZE / SLURM_PROCID for a single-process run"
                ))
            })
        };
        let port = |v: String| -> Result<u16> {
            v.trim()
                .parse()
                .map_err(|_| Error::Arg(format!("MASTER_PORT={v:?} is not a port number")))
        };
        let env = if let Some(rank) = num("RANK")? {
            let world_size = num("WORLD_SIZE")?.ok_or_else(|| {
                Error::Arg("RANK is set but WORLD_SIZE is not (torchrun sets both)".into())
            })?;
            LaunchEnv {
                launcher: Launcher::Torchrun,
                rank,
                world_size,
                local_rank: num("LOCAL_RANK")?.unwrap_or(0),
                local_world_size: num("LOCAL_WORLD_SIZE")?.unwrap_or(1),
                master_addr: need("MASTER_ADDR", "torchrun")?,
                master_port: port(need("MASTER_PORT", "torchrun")?)?,
            }
        } else if let Some(rank) = num("SLURM_PROCID")? {
            let world_size = num("SLURM_NTASKS")?.ok_or_else(|| {
                Error::Arg(
                    "SLURM_PROCID is set but SLURM_NTASKS is not (run the job step with srun)"
                        .into(),
                )
            })?;
            let master_addr = match get("MASTER_ADDR").filter(|v| !v.is_empty()) {
                Some(addr) => addr,
                None => {
                    let list = get("SLURM_STEP_NODELIST")
                        .or_else(|| get("SLURM_JOB_NODELIST"))
                        .ok_or_else(|| {
                            Error::Arg(
                                "Slurm variables found but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST to find \
                                 rank 0's host: set MASTER_ADDR"
                                    .into(),
                            )
                        })?;
                    first_slurm_host(&list)?
                }
            };
            let master_port = match get("MASTER_PORT").filter(|v| !v.is_empty()) {
                Some(p) => port(p)?,
                None => match num("SLURM_JOB_ID")? {
                    Some(job) => 20000 + (job % 20000) as u16,
                    None => {
                        return Err(Error::Arg(
                            "Slurm variables found but neither MASTER_PORT nor SLURM_JOB_ID: set MASTER_PORT"
                                .into(),
                        ))
                    }
                },
            };
            LaunchEnv {
                launcher: Launcher::Slurm,
                rank,
                world_size,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(0),
                local_world_size: get("SLURM_STEP_TASKS_PER_NODE")
                    .or_else(|| get("SLURM_NTASKS_PER_NODE"))
                    .and_then(|v| first_count(&v))
                    .unwrap_or(1),
                master_addr,
                master_port,
            }
        } else {
            return Ok(None);
        };
        if env.world_size == 0 || env.rank >= env.world_size {
            return Err(Error::Arg(format!(
                "rank {} of a world of {} processes: the launcher's variables are inconsistent",
                env.rank, env.world_size
            )));
        }
        if env.local_world_size == 0 || env.local_rank >= env.local_world_size {
            return Err(Error::Arg(format!(
                "local rank {} of {} processes on this node: the launcher's variables are inconsistent",
                env.local_rank, env.local_world_size
            )));
        }
        Ok(Some(env))
    }
}

/// The first count of a Slurm tasks-per-node list such as `8(x2),4` (`8`).
fn first_count(v: &str) -> Option<usize> {
    v.split([',', '(']).next()?.trim().parse().ok()
}

/// The first host of a Slurm node list in its compressed form: `gpu[07-09,12],login1` → `gpu07` (zero padding
/// kept), `node5,node6` → `node5`, `rack[1-2]-n[01-04]` → `rack1-n01`.
pub fn first_slurm_host(list: &str) -> Result<String> {
    let bad = || {
        Error::Arg(format!(
            "cannot read the Slurm node list {list:?}: set MASTER_ADDR to rank 0's host"
        ))
    };
    // the first entry: up to a comma outside brackets
    let mut depth = 0usize;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1).ok_or_else(bad)?,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let entry = list[..end].trim();
    if entry.is_empty() || depth != 0 {
        return Err(bad());
    }
    // every bracket group contributes its first value
    let mut host = String::new();
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = rest[open..].find(']').ok_or_else(bad)? + open;
        let first = rest[open + 1..close]
            .split(',')
            .next()
            .and_then(|r| r.split('-').next())
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
            .ok_or_else(bad)?;
        host.push_str(first);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    if host.contains(']') {
        return Err(bad());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_launcher_variables_is_a_single_process_run() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("LOCAL_RANK", "3")]).unwrap(), None);
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "11"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "3"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "29500"),
            // torchrun inside a Slurm allocation: torchrun's variables win
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            LaunchEnv {
                launcher: Launcher::Torchrun,
                rank: 11,
                world_size: 16,
                local_rank: 3,
                local_world_size: 8,
                master_addr: "10.0.0.7".into(),
                master_port: 29500,
            }
        );
    }

    #[test]
    fn slurm_variables() {
        let e = env(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "8(x2)"),
            ("SLURM_STEP_NODELIST", "gpu[007-008]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.launcher, Launcher::Slurm);
        assert_eq!((e.rank, e.world_size), (9, 16));
        assert_eq!((e.local_rank, e.local_world_size), (1, 8));
        assert_eq!(e.master_addr, "gpu007");
        assert_eq!(e.master_port, 20000 + (123456 % 20000) as u16);
        // MASTER_ADDR / MASTER_PORT override
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_NODELIST", "a,b"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.master_addr.as_str(), e.master_port), ("head", 4000));
        assert_eq!(e.local_world_size, 1);
    }

    #[test]
    fn inconsistent_or_missing_variables_are_refused_with_their_names() {
        for (pairs, needle) in [
            (vec![("RANK", "0")], "WORLD_SIZE"),
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=\"x\""),
            (
                vec![
                    ("RANK", "2"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "rank 2 of a world of 2",
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
                "MASTER_ADDR",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "1"),
                    ("LOCAL_WORLD_SIZE", "1"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "local rank 1 of 1",
            ),
            (
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")],
                "NODELIST",
            ),
            (
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_JOB_NODELIST", "n1"),
                ],
                "MASTER_PORT",
            ),
        ] {
            let err = env(&pairs).unwrap_err().to_string();
            assert!(err.contains(needle), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn slurm_node_lists() {
        for (list, first) in [
            ("node5", "node5"),
            ("node5,node6", "node5"),
            ("gpu[07-09,12],login1", "gpu07"),
            ("gpu[12,07-09]", "gpu12"),
            ("rack[1-2]-n[01-04]", "rack1-n01"),
            ("a-b[3]", "a-b3"),
        ] {
            assert_eq!(first_slurm_host(list).unwrap(), first, "{list}");
        }
        for bad in ["", "gpu[", "gpu[x-1]", "gpu]1[", "[]"] {
            assert!(first_slurm_host(bad).is_err(), "{bad:?}");
        }
    }
}
