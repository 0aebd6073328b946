//! The CPU collective: the ranks meet at `MASTER_ADDR:MASTER_PORT`, form a ring of TCP connections and
//! all-reduce over it (reduce-scatter, then all-gather: each rank sends and receives 2·(W−1)/W of the buffer).
//! For CPU runs and for testing the multi-process code path without GPUs; GPUs use NCCL.
//!
//! Rendezvous: rank 0 listens at the master address; every other rank connects there (retrying until the
//! timeout, since rank 0 may start later) and says its rank, the world size it was told, and where its own ring
//! listener is. Rank 0 checks that the world sizes agree and that every rank came once, then sends everyone the
//! table of ring addresses. Each rank connects to the next rank's listener and accepts the previous rank.
//!
//! Every wait (connect, accept, read, write) ends after the timeout with an error that names this rank, the
//! rank waited for and its address; a rank that exits closes its sockets, and its neighbours fail at once with
//! "closed the connection", so no rank hangs on a dead peer.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::LaunchEnv;
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"SSR1";
/// How often a waiting connect or accept retries.
const POLL: Duration = Duration::from_millis(20);

/// A ring of TCP connections between the ranks of one run.
pub struct TcpRing {
    rank: usize,
    world_size: usize,
    /// (to the next rank, from the previous rank); `None` for a world of one.
    links: Option<(Link, Link)>,
    timeout: Duration,
}

/// One connection of the ring, with the peer it reaches (for error messages).
struct Link {
    stream: TcpStream,
    peer: usize,
    addr: String,
}

/// An element type the ring can sum (sent as its in-memory bytes: every rank runs on the same kind of
/// little-endian machine).
pub trait RingElem: bytemuck::Pod + Send + Sync + std::ops::Add<Output = Self> {}

impl RingElem for f32 {}
impl RingElem for f64 {}

#[cfg(target_endian = "big")]
compile_error!("the CPU ring collective sends numbers as little-endian bytes");

fn dist_err(rank: usize, msg: String) -> Error {
    Error::Dist(format!("rank {rank}: {msg}"))
}

fn io_msg(e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("nothing within the {} s timeout", timeout.as_secs_f64())
        }
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => "it closed the connection (did that rank exit or crash?)".into(),
        _ => e.to_string(),
    }
}

impl Link {
    fn send(&mut self, rank: usize, timeout: Duration, payload: &[u8]) -> Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        self.stream
            .write_all(&len)
            .and_then(|_| self.stream.write_all(payload))
            .map_err(|e| {
                dist_err(
                    rank,
                    format!(
                        "sending to rank {} at {} failed: {}",
                        self.peer,
                        self.addr,
                        io_msg(&e, timeout)
                    ),
                )
            })
    }

    /// Receives exactly `into.len()` bytes (a length header says how many were sent).
    fn recv(&mut self, rank: usize, timeout: Duration, into: &mut [u8]) -> Result<()> {
        let fail = |e: std::io::Error, link: &Link| {
            dist_err(
                rank,
                format!(
                    "waiting for rank {} at {}: {}",
                    link.peer,
                    link.addr,
                    io_msg(&e, timeout)
                ),
            )
        };
        let mut len = [0u8; 8];
        self.stream
            .read_exact(&mut len)
            .map_err(|e| fail(e, self))?;
        let len = u64::from_le_bytes(len) as usize;
        if len != into.len() {
            return Err(dist_err(
                rank,
                format!(
                    "rank {} sent {len} bytes where {} were due: the ranks are out of step (different \
                     options or data on different ranks?)",
                    self.peer,
                    into.len()
                ),
            ));
        }
        self.stream.read_exact(into).map_err(|e| fail(e, self))
    }
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

/// Connects to `addr`, retrying until `deadline` (the peer may not listen yet).
fn connect_until(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let targets: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    loop {
        let mut last = None;
        for target in &targets {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(target, left.max(Duration::from_millis(1))) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        if Instant::now() >= deadline {
            return Err(last.unwrap_or_else(|| ErrorKind::TimedOut.into()));
        }
        std::thread::sleep(POLL);
    }
}

/// Accepts one connection before `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(ErrorKind::TimedOut.into());
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e),
        }
    }
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// Reads what [`put_u32`] / [`put_str`] wrote.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Option<usize> {
        let (head, rest) = self.0.split_at_checked(4)?;
        self.0 = rest;
        Some(u32::from_le_bytes(head.try_into().ok()?) as usize)
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u32()?;
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        String::from_utf8(head.to_vec()).ok()
    }
}

/// One framed message on a rendezvous connection.
fn send_msg(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(MAGIC)?;
    stream.write_all(&(payload.len() as u32).to_le_bytes())?;
    stream.write_all(payload)
}

fn recv_msg(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 8];
    stream.read_exact(&mut head)?;
    if &head[..4] != MAGIC {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "not a sana-sprint rank (another program on this port?)",
        ));
    }
    let n = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

impl TcpRing {
    /// Joins the ring of the run `env` describes (rank 0 listens at `MASTER_ADDR:MASTER_PORT`).
    pub fn rendezvous(env: &LaunchEnv, timeout: Duration) -> Result<TcpRing> {
        let master = format!("{}:{}", env.master_addr, env.master_port);
        let listener = if env.rank == 0 {
            Some(
                TcpListener::bind(("0.0.0.0", env.master_port)).map_err(|e| {
                    dist_err(
                        0,
                        format!(
                            "cannot listen on port {} for the other ranks: {e} (is MASTER_PORT taken by another run?)",
                            env.master_port
                        ),
                    )
                })?,
            )
        } else {
            None
        };
        Self::join(env.rank, env.world_size, &master, listener, timeout)
    }

    /// Joins a ring whose rank 0 listens at `master` (`host:port`); rank 0 passes its bound `listener`.
    pub fn join(
        rank: usize,
        world_size: usize,
        master: &str,
        listener: Option<TcpListener>,
        timeout: Duration,
    ) -> Result<TcpRing> {
        if world_size <= 1 {
            return Ok(TcpRing {
                rank,
                world_size: 1,
                links: None,
                timeout,
            });
        }
        let deadline = Instant::now() + timeout;
        let err = |msg: String| dist_err(rank, msg);
        // the ring listener, on the interface that reaches rank 0 (found below) or any interface
        let ring = TcpListener::bind(("0.0.0.0", 0))
            .map_err(|e| err(format!("cannot open a port for the ring: {e}")))?;
        let ring_port = ring
            .local_addr()
            .map_err(|e| err(format!("ring port: {e}")))?
            .port();
        let table: Vec<String> = if rank == 0 {
            let listener =
                listener.ok_or_else(|| err("rank 0 needs the master listener".into()))?;
            let master_host = master.rsplit_once(':').map_or(master, |(h, _)| h);
            let mut table = vec![String::new(); world_size];
            table[0] = format!("{master_host}:{ring_port}");
            let mut joined = Vec::new();
            for _ in 1..world_size {
                let mut s = accept_until(&listener, deadline).map_err(|e| {
                    let missing: Vec<usize> =
                        (1..world_size).filter(|r| table[*r].is_empty()).collect();
                    err(format!(
                        "waiting at {master} for ranks {missing:?}: {}",
                        io_msg(&e, timeout)
                    ))
                })?;
                configure(&s, timeout).map_err(|e| err(e.to_string()))?;
                let hello = recv_msg(&mut s).map_err(|e| err(format!("a rank's hello: {e}")))?;
                let mut r = Reader(&hello);
                let (peer, peer_world, host, port) =
                    (|| Some((r.u32()?, r.u32()?, r.str()?, r.u32()?)))()
                        .ok_or_else(|| err("a malformed hello from a rank".into()))?;
                if peer_world != world_size {
                    return Err(err(format!(
                        "rank {peer} was started with a world of {peer_world} processes, this one with \
                         {world_size}: start every rank with the same WORLD_SIZE"
                    )));
                }
                if peer == 0 || peer >= world_size || !table[peer].is_empty() {
                    return Err(err(format!(
                        "rank {peer} joined twice or does not exist in a world of {world_size}"
                    )));
                }
                table[peer] = format!("{host}:{port}");
                joined.push(s);
            }
            let mut msg = Vec::new();
            for addr in &table {
                put_str(&mut msg, addr);
            }
            for s in &mut joined {
                send_msg(s, &msg).map_err(|e| err(format!("sending the ring table: {e}")))?;
            }
            table
        } else {
            let mut s = connect_until(master, deadline).map_err(|e| {
                err(format!(
                    "cannot reach rank 0 at {master}: {} (is rank 0 running, and MASTER_ADDR / MASTER_PORT \
                     the same on every rank?)",
                    io_msg(&e, timeout)
                ))
            })?;
            configure(&s, timeout).map_err(|e| err(e.to_string()))?;
            let ip: IpAddr = s.local_addr().map_err(|e| err(e.to_string()))?.ip();
            let mut hello = Vec::new();
            put_u32(&mut hello, rank);
            put_u32(&mut hello, world_size);
            put_str(&mut hello, &ip.to_string());
            put_u32(&mut hello, ring_port as usize);
            send_msg(&mut s, &hello).map_err(|e| err(format!("hello to rank 0: {e}")))?;
            let msg = recv_msg(&mut s).map_err(|e| {
                err(format!(
                    "waiting for rank 0's ring table at {master}: {}",
                    io_msg(&e, timeout)
                ))
            })?;
            let mut r = Reader(&msg);
            let table: Option<Vec<String>> = (0..world_size).map(|_| r.str()).collect();
            table.ok_or_else(|| err("a malformed ring table from rank 0".into()))?
        };
        let next = (rank + 1) % world_size;
        let prev = (rank + world_size - 1) % world_size;
        let mut to_next = connect_until(&table[next], deadline).map_err(|e| {
            err(format!(
                "cannot reach rank {next} at {}: {}",
                table[next],
                io_msg(&e, timeout)
            ))
        })?;
        configure(&to_next, timeout).map_err(|e| err(e.to_string()))?;
        to_next
            .write_all(&(rank as u32).to_le_bytes())
            .map_err(|e| err(format!("greeting rank {next}: {e}")))?;
        let mut from_prev = accept_until(&ring, deadline).map_err(|e| {
            err(format!(
                "waiting for rank {prev} ({}) to connect: {}",
                table[prev],
                io_msg(&e, timeout)
            ))
        })?;
        configure(&from_prev, timeout).map_err(|e| err(e.to_string()))?;
        let mut who = [0u8; 4];
        from_prev.read_exact(&mut who).map_err(|e| {
            err(format!(
                "greeting from rank {prev}: {}",
                io_msg(&e, timeout)
            ))
        })?;
        if u32::from_le_bytes(who) as usize != prev {
            return Err(err(format!(
                "expected rank {prev} on the ring, rank {} connected",
                u32::from_le_bytes(who)
            )));
        }
        Ok(TcpRing {
            rank,
            world_size,
            links: Some((
                Link {
                    stream: to_next,
                    peer: next,
                    addr: table[next].clone(),
                },
                Link {
                    stream: from_prev,
                    peer: prev,
                    addr: table[prev].clone(),
                },
            )),
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Sums `buf` element-wise over all ranks, in place; every rank ends with bit-identical values (each chunk
    /// is summed on one rank and copied to the others).
    pub fn all_reduce_sum<T: RingElem>(&mut self, buf: &mut [T]) -> Result<()> {
        let (rank, w, timeout) = (self.rank, self.world_size, self.timeout);
        let Some((to_next, from_prev)) = self.links.as_mut() else {
            return Ok(());
        };
        let n = buf.len();
        let bounds = |c: usize| (c * n / w, (c + 1) * n / w);
        let mut incoming: Vec<T> = Vec::with_capacity(n / w + 1);
        // one exchange: send chunk `send`, receive chunk `recv` (sending on a second thread, so that two ranks
        // writing large chunks to each other cannot both block on full socket buffers)
        let mut exchange = |buf: &mut [T], send: usize, recv: usize, add: bool| -> Result<()> {
            let (s0, s1) = bounds(send);
            let (r0, r1) = bounds(recv);
            incoming.clear();
            incoming.resize(r1 - r0, T::zeroed());
            let payload: &[T] = &buf[s0..s1];
            let into: &mut [u8] = bytemuck::cast_slice_mut(&mut incoming[..]);
            std::thread::scope(|scope| {
                let sender =
                    scope.spawn(|| to_next.send(rank, timeout, bytemuck::cast_slice(payload)));
                let received = from_prev.recv(rank, timeout, into);
                let sent = sender
                    .join()
                    .unwrap_or_else(|_| Err(dist_err(rank, "the sending thread panicked".into())));
                sent.and(received)
            })?;
            let dst = &mut buf[r0..r1];
            if add {
                for (d, &v) in dst.iter_mut().zip(incoming.iter()) {
                    *d = *d + v;
                }
            } else {
                dst.copy_from_slice(&incoming);
            }
            Ok(())
        };
        for s in 0..w - 1 {
            exchange(buf, (rank + w - s) % w, (rank + w - s - 1) % w, true)?;
        }
        for s in 0..w - 1 {
            exchange(buf, (rank + 1 + w - s) % w, (rank + w - s) % w, false)?;
        }
        Ok(())
    }

    /// Copies rank 0's `buf` to every rank (passed along the ring; `buf` has the same length everywhere). Used
    /// to hand out NCCL's unique id.
    pub fn broadcast_from_rank0(&mut self, buf: &mut [u8]) -> Result<()> {
        let (rank, w, timeout) = (self.rank, self.world_size, self.timeout);
        let Some((to_next, from_prev)) = self.links.as_mut() else {
            return Ok(());
        };
        if rank > 0 {
            from_prev.recv(rank, timeout, buf)?;
        }
        if rank + 1 < w {
            to_next.send(rank, timeout, buf)?;
        }
        Ok(())
    }

    /// Returns when every rank has called it (or fails after the timeout, naming the rank waited for).
    pub fn barrier(&mut self) -> Result<()> {
        let mut token = [0f32; 1];
        self.all_reduce_sum(&mut token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on `world` ranks (threads) joined on a loopback ring; returns each rank's result.
    fn on_ring<R: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(TcpRing) -> R + Sync,
    ) -> Vec<Result<R>> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let master = listener.local_addr().unwrap().to_string();
        let mut listener = Some(listener);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let l = if rank == 0 { listener.take() } else { None };
                    let (master, f) = (master.clone(), &f);
                    scope.spawn(move || TcpRing::join(rank, world, &master, l, timeout).map(f))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn all_reduce_sums_exactly_on_every_rank() {
        for world in [1, 2, 3, 5] {
            for n in [0, 1, 4, 7, 1000, 100_003] {
                let results = on_ring(world, Duration::from_secs(20), |mut ring| {
                    let r = ring.rank();
                    let mut buf: Vec<f32> = (0..n).map(|i| (i * (r + 1)) as f32 * 0.5).collect();
                    ring.all_reduce_sum(&mut buf).unwrap();
                    let mut wide: Vec<f64> = (0..n).map(|i| (i + r) as f64).collect();
                    ring.all_reduce_sum(&mut wide).unwrap();
                    ring.barrier().unwrap();
                    (buf, wide)
                });
                let ranks_sum: usize = (1..=world).sum();
                let first = results[0].as_ref().unwrap().clone();
                for (r, res) in results.into_iter().enumerate() {
                    let (buf, wide) = res.unwrap();
                    for i in 0..n {
                        // small integers and halves: exact in f32 whatever the order of the sum
                        assert_eq!(
                            buf[i],
                            (i * ranks_sum) as f32 * 0.5,
                            "world {world} n {n} rank {r} i {i}"
                        );
                        assert_eq!(wide[i], (i * world + world * (world - 1) / 2) as f64);
                    }
                    assert_eq!(buf, first.0, "rank {r} differs from rank 0");
                }
            }
        }
    }

    #[test]
    fn broadcast_hands_rank_0s_bytes_to_every_rank() {
        for world in [1, 2, 4] {
            let results = on_ring(world, Duration::from_secs(20), |mut ring| {
                let r = ring.rank() as u8;
                let mut id: Vec<u8> = (0..128u8)
                    .map(|i| i.wrapping_mul(7).wrapping_add(r))
                    .collect();
                ring.broadcast_from_rank0(&mut id).unwrap();
                id
            });
            let expected: Vec<u8> = (0..128u8).map(|i| i.wrapping_mul(7)).collect();
            for (r, res) in results.into_iter().enumerate() {
                assert_eq!(res.unwrap(), expected, "world {world} rank {r}");
            }
        }
    }

    #[test]
    fn a_rank_that_dies_makes_the_others_fail_instead_of_hanging() {
        let started = Instant::now();
        let results = on_ring(3, Duration::from_secs(10), |mut ring| {
            if ring.rank() == 1 {
                drop(ring); // "crashes": its sockets close
                return Ok(());
            }
            let mut buf = vec![1f32; 1000];
            ring.all_reduce_sum(&mut buf)
        });
        assert!(results[1].as_ref().unwrap().is_ok());
        for r in [0, 2] {
            let err = results[r]
                .as_ref()
                .unwrap()
                .as_ref()
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("distributed run, rank {r}:")),
                "{err}"
            );
            assert!(err.contains("closed the connection"), "{err}");
        }
        // rank 2 waits on rank 1 directly (rank 0 may first see rank 2 give up)
        let err = results[2]
            .as_ref()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 1"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_missing_rank_times_out_with_its_number() {
        // rank 0 of a world of 2 whose rank 1 never comes
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let master = listener.local_addr().unwrap().to_string();
        let started = Instant::now();
        let err = TcpRing::join(0, 2, &master, Some(listener), Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("rank 0") && err.contains("[1]") && err.contains("timeout"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // a rank whose rank 0 never comes
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = TcpRing::join(
            1,
            2,
            &format!("127.0.0.1:{port}"),
            None,
            Duration::from_millis(300),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("cannot reach rank 0"), "{err}");
    }

    #[test]
    fn ranks_started_with_different_world_sizes_are_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let master = listener.local_addr().unwrap().to_string();
        let timeout = Duration::from_secs(5);
        let (a, _b) = std::thread::scope(|scope| {
            let m = master.clone();
            let a = scope.spawn(move || TcpRing::join(0, 2, &m, Some(listener), timeout).err());
            let b = scope.spawn(move || TcpRing::join(1, 3, &master, None, timeout).err());
            (a.join().unwrap(), b.join().unwrap())
        });
        let err = a.unwrap().to_string();
        assert!(
            err.contains("world of 3") && err.contains("WORLD_SIZE"),
            "{err}"
        );
    }
}
