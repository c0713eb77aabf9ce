//! Wake-up pacing: when the loop reads next, and when it asks writers to NOTIFY.

use std::time::Duration;

/// When the loop reads next. A busy leader polls on its own so that writers need not NOTIFY (a
/// notifying commit takes a database-wide lock that serializes all commits): it reads again at
/// once after a read that found rows, and after empty reads waits 1, 2, 4, then 8 ms. After
/// `IDLE_AFTER` of empty reads it turns idle: it asks the insert trigger to NOTIFY again, reads
/// once more (a row committed just before the request took effect is not left waiting), then
/// sleeps until a notification or --poll-interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    Busy {
        empty_for: Duration,
        next_wait: Duration,
    },
    /// `confirmed`: the read after asking for notifications has been done.
    Idle { confirmed: bool },
}

const BUSY_POLL_MAX: Duration = Duration::from_millis(8);
const IDLE_AFTER: Duration = Duration::from_millis(50);

impl Pace {
    pub fn start() -> Pace {
        Pace::Busy {
            empty_for: Duration::ZERO,
            next_wait: Duration::ZERO,
        }
    }

    /// How long to wait (for a notification at most) before the next read.
    pub fn wait(&self, poll_interval: Duration) -> Duration {
        match *self {
            Pace::Busy { next_wait, .. } => next_wait,
            Pace::Idle { confirmed: false } => Duration::ZERO,
            Pace::Idle { confirmed: true } => poll_interval,
        }
    }

    /// The pace after a read that found `rows` rows.
    pub fn after_read(self, rows: usize) -> Pace {
        match self {
            _ if rows > 0 => Pace::start(),
            Pace::Busy {
                empty_for,
                next_wait,
            } => {
                let empty_for = empty_for + next_wait;
                if empty_for >= IDLE_AFTER {
                    Pace::Idle { confirmed: false }
                } else {
                    let next_wait = (next_wait * 2).clamp(Duration::from_millis(1), BUSY_POLL_MAX);
                    Pace::Busy {
                        empty_for,
                        next_wait,
                    }
                }
            }
            Pace::Idle { .. } => Pace::Idle { confirmed: true },
        }
    }

    pub fn is_idle(&self) -> bool {
        matches!(self, Pace::Idle { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_polls_fast_while_busy_and_turns_idle_after_empty_reads() {
        let poll = Duration::from_secs(1);
        let mut p = Pace::start();
        assert_eq!(p.wait(poll), Duration::ZERO, "read at once on start");
        p = p.after_read(5);
        assert_eq!(
            p.wait(poll),
            Duration::ZERO,
            "rows found: read again at once"
        );
        let mut waits = vec![];
        while !p.is_idle() {
            p = p.after_read(0);
            waits.push(p.wait(poll).as_millis());
        }
        assert_eq!(&waits[..5], &[1, 2, 4, 8, 8], "backs off to 8 ms");
        let polled: u128 = waits.iter().sum();
        assert!(
            (50..70).contains(&polled),
            "idle after ~50 ms of empty reads: {waits:?}"
        );
        assert_eq!(
            p.wait(poll),
            Duration::ZERO,
            "one more read after asking for NOTIFY"
        );
        p = p.after_read(0);
        assert!(p.is_idle());
        assert_eq!(
            p.wait(poll),
            poll,
            "then sleep until NOTIFY or the poll interval"
        );
        p = p.after_read(1);
        assert_eq!(p, Pace::start(), "rows while idle: busy again");
    }
}
