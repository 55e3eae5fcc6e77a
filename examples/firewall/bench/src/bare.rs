//! The floor of benchmark (b): a bare cross-thread round trip — one thread sends a message to
//! another over a `std::sync::mpsc` channel and waits for its answer on a second one — with no
//! simulator, no driver and no service. Asking a user-mode service from `classifyFn` cannot take
//! fewer than such a round trip: the question goes to another thread and the answer comes back.

use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// An echo thread and the two channels to it.
pub struct PingPong {
    to_echo: Option<mpsc::Sender<u64>>,
    from_echo: mpsc::Receiver<u64>,
    echo: Option<JoinHandle<()>>,
}

impl PingPong {
    /// Starts the echo thread.
    pub fn start() -> PingPong {
        let (to_echo, requests) = mpsc::channel::<u64>();
        let (answers, from_echo) = mpsc::channel::<u64>();
        let echo = thread::spawn(move || {
            for request in requests {
                if answers.send(request + 1).is_err() {
                    return;
                }
            }
        });
        PingPong {
            to_echo: Some(to_echo),
            from_echo,
            echo: Some(echo),
        }
    }

    /// `count` round trips one after another, each timed from the send to the answer's
    /// receipt.
    pub fn round_trips(&self, count: usize) -> Vec<Duration> {
        let to_echo = self.to_echo.as_ref().expect("running");
        (0..count as u64)
            .map(|i| {
                let began = Instant::now();
                to_echo.send(i).expect("the echo thread runs");
                let answer = self.from_echo.recv().expect("the echo thread answers");
                let elapsed = began.elapsed();
                assert_eq!(answer, i + 1, "the answer to this message");
                elapsed
            })
            .collect()
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        // Closing the channel ends the echo thread.
        self.to_echo.take();
        if let Some(echo) = self.echo.take() {
            let _ = echo.join();
        }
    }
}
