//! Throws malformed input at the emulator: random bytes, bad headers, lying size fields and
//! garbage performatives. The server must not panic, and a well-behaved connection made
//! afterwards must still be served. The generator is seeded, so a failure reproduces.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fe2o3_amqp_types::definitions::Handle;
use fe2o3_amqp_types::performatives::{Begin, Open, Performative};
use servicebus_emulator::frame::{AMQP_HEADER, SASL_HEADER, encode_amqp, encode_raw};
use servicebus_emulator::{Emulator, EmulatorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

static PANICKED: AtomicBool = AtomicBool::new(false);

/// xorshift64*: tiny, deterministic, no dependency on a particular `rand` API.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn open_frame() -> Vec<u8> {
    let open = Open {
        container_id: "fuzz".into(),
        hostname: None,
        max_frame_size: Default::default(),
        channel_max: Default::default(),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    encode_amqp(0, &Performative::Open(open), &[]).unwrap_or_default()
}

fn begin_frame() -> Vec<u8> {
    let begin = Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 100,
        outgoing_window: 100,
        handle_max: Handle(10),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    encode_amqp(0, &Performative::Begin(begin), &[]).unwrap_or_default()
}

/// One malformed conversation.
fn garbage(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    match rng.below(7) {
        0 => {
            let n = rng.below(2048) as usize;
            out.extend(rng.bytes(n));
        }
        1 => {
            out.extend_from_slice(b"AMQP");
            out.extend(rng.bytes(4));
            let n = rng.below(256) as usize;
            out.extend(rng.bytes(n));
        }
        2 => {
            // SASL header then a garbage SASL frame.
            out.extend_from_slice(&SASL_HEADER);
            let n = rng.below(64) as usize;
            out.extend(encode_raw(1, 0, &rng.bytes(n)));
        }
        3 => {
            // A lying size field after a good header and open.
            out.extend_from_slice(&AMQP_HEADER);
            out.extend(open_frame());
            out.extend_from_slice(&(rng.next() as u32).to_be_bytes());
            out.extend(rng.bytes(16));
        }
        4 => {
            // Described performative codes with random fields.
            out.extend_from_slice(&AMQP_HEADER);
            out.extend(open_frame());
            out.extend(begin_frame());
            for _ in 0..rng.below(8) + 1 {
                let mut body = vec![0x00, 0x53, 0x10 + rng.below(9) as u8];
                let n = rng.below(64) as usize;
                body.extend(rng.bytes(n));
                out.extend(encode_raw(0, rng.below(3) as u16, &body));
            }
        }
        5 => {
            // A valid open followed by a truncated copy of itself.
            out.extend_from_slice(&AMQP_HEADER);
            let open = open_frame();
            out.extend_from_slice(&open);
            let cut = rng.below(open.len() as u64) as usize;
            out.extend_from_slice(&open[..cut]);
        }
        _ => {
            // Bad data offsets.
            out.extend_from_slice(&AMQP_HEADER);
            out.extend(open_frame());
            let mut frame = begin_frame();
            if frame.len() > 4 {
                frame[4] = rng.below(256) as u8;
            }
            out.extend(frame);
        }
    }
    out
}

async fn throw(addr: SocketAddr, bytes: Vec<u8>) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = s.write_all(&bytes).await;
    let mut sink = vec![0u8; 4096];
    // Read until the server closes or goes quiet; either is fine.
    let _ = timeout(Duration::from_millis(200), async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// A correct client: plain header, open, begin; returns whether both were answered.
async fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let mut req = AMQP_HEADER.to_vec();
    req.extend(open_frame());
    req.extend(begin_frame());
    if s.write_all(&req).await.is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            // header + open + begin all arrived?
            if got.len() >= 8 && count_frames(&got[8..]) >= 2 {
                return;
            }
        }
    })
    .await;
    read.is_ok() && got.starts_with(&AMQP_HEADER) && count_frames(&got[8..]) >= 2
}

fn count_frames(mut b: &[u8]) -> usize {
    let mut n = 0;
    while b.len() >= 4 {
        let size = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if size < 8 || size > b.len() {
            break;
        }
        b = &b[size..];
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_never_breaks_the_server() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        previous(info);
    }));
    let config = EmulatorConfig::new(([127, 0, 0, 1], 0).into());
    let handle = match Emulator::start(config).await {
        Ok(h) => h,
        Err(e) => panic!("emulator did not start: {e}"),
    };
    let addr = handle.local_addr();
    assert!(
        healthy(addr).await,
        "a clean connection works before fuzzing"
    );
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for round in 0..300 {
        let bytes = garbage(&mut rng);
        throw(addr, bytes).await;
        if round % 50 == 49 {
            assert!(
                healthy(addr).await,
                "server stopped serving after round {round}"
            );
        }
    }
    assert!(
        healthy(addr).await,
        "a clean connection works after fuzzing"
    );
    assert!(!PANICKED.load(Ordering::SeqCst), "a task panicked");
    handle.shutdown().await;
}
