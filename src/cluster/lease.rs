//! The arithmetic of leases and start-up claims: pure functions, no I/O.
//!
//! A claim's lease ends at `lease_until`, set by the coordination database's own clock
//! (`now() + lease-timeout`) at each renewal. A replica cannot read that clock, but it
//! knows when it *sent* a renewal: the database evaluated `now()` after that instant,
//! so the lease lasts at least `lease-timeout` from it, measured on the replica's
//! monotonic clock (clock rates agree to parts per million; their offsets do not matter).
//! That is what makes self-fencing safe without synchronised clocks.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// How often a replica renews its claims and its membership: three renewals per lease,
/// so that two lost in a row still leave time to fence.
pub fn renew_every(lease: Duration) -> Duration {
    lease / 3
}

/// How often the fencing check looks at the deadlines (four times per renewal).
pub fn tick_every(lease: Duration) -> Duration {
    lease / 12
}

/// A claim is renewed once it is this old (by the database's clock). A run that ends
/// sooner is never renewed, which is what the cluster-wide overlap guard looks at: a
/// claim blocks the job's next claims only once renewed, so that a replica killed in
/// the middle of a short run (a claim nobody will ever finish) does not hold up the
/// next slots for a whole lease. Renewal rounds are [`renew_every`] apart, so the first
/// renewal comes by half the lease, before [`fence_at`].
pub fn renew_after_age(lease: Duration) -> Duration {
    lease / 6
}

/// The longest one coordination query may take before it counts as failed; a query
/// stuck behind a partition must not hold up the next renewal round.
pub fn query_timeout(lease: Duration) -> Duration {
    (lease / 6).max(Duration::from_millis(500))
}

/// When a replica must have cancelled a claimed run whose lease it could not renew
/// since it sent the renewal (or claim) at `renewed`: two thirds into the lease. The
/// check runs every [`tick_every`], so it cancels at most three quarters into the
/// lease, which leaves the job a quarter of the lease to stop before any replica may
/// see the claim expired (in the database's clock, which starts later than `renewed`).
pub fn fence_at(renewed: Instant, lease: Duration) -> Instant {
    renewed + lease * 2 / 3
}

/// One recent `@startup` claim of a job, as read under the job's advisory lock.
#[derive(Debug, Clone, Copy)]
pub struct StartupClaim {
    pub claimed_at: DateTime<Utc>,
    pub finished: bool,
    pub lease_until: DateTime<Utc>,
}

/// Whether a new `@startup` claim wins, at the database's `now`. A start-up run has no
/// fire time shared by the replicas, so the rule is: it wins unless another start-up
/// claim of the same job was made within `window` (replicas started together) or is
/// still running with a live lease (a long start-up migration). The claims are read and
/// the new one written under one advisory transaction lock, so of N replicas started
/// together exactly one wins; a replica restarted later than `window` runs it again,
/// as a single daemon would at each start.
pub fn startup_claim_wins(now: DateTime<Utc>, window: Duration, recent: &[StartupClaim]) -> bool {
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    !recent.iter().any(|c| {
        let recent = now.signed_duration_since(c.claimed_at) < window;
        let running = !c.finished && c.lease_until > now;
        recent || running
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("time")
    }

    #[test]
    fn renewals_checks_and_fences_fit_in_one_lease() {
        let lease = Duration::from_secs(20);
        assert_eq!(renew_every(Duration::from_secs(21)), Duration::from_secs(7));
        // Fenced at the latest one check after the deadline, still inside the lease.
        let t0 = Instant::now();
        let latest_cancel = fence_at(t0, lease) + tick_every(lease);
        assert!(latest_cancel + lease / 5 < t0 + lease);
        // A healthy claim is first renewed (by age, then at the next round, which may
        // wait for a query timeout) well before it would be fenced.
        let first_renewal = renew_after_age(lease) + renew_every(lease) + tick_every(lease);
        assert!(t0 + first_renewal < fence_at(t0, lease));
        // Two renewals in a row may fail before the fence falls.
        assert!(fence_at(t0, lease) >= t0 + renew_every(lease) * 2);
        // A query never waits longer than half a renewal period (but at least 500 ms).
        assert!(query_timeout(lease) <= renew_every(lease) / 2);
        assert_eq!(
            query_timeout(Duration::from_secs(3)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn the_first_startup_claim_wins_and_later_ones_within_the_window_lose() {
        let window = Duration::from_secs(20);
        assert!(startup_claim_wins(at(0), window, &[]));
        let first = StartupClaim {
            claimed_at: at(0),
            finished: true,
            lease_until: at(0),
        };
        assert!(!startup_claim_wins(at(1), window, &[first]));
        assert!(!startup_claim_wins(at(19), window, &[first]));
        // A replica started long after runs it again, as a single daemon would.
        assert!(startup_claim_wins(at(21), window, &[first]));
    }

    #[test]
    fn a_running_startup_claim_blocks_until_its_lease_ends() {
        let window = Duration::from_secs(20);
        let running = StartupClaim {
            claimed_at: at(0),
            finished: false,
            lease_until: at(100),
        };
        assert!(!startup_claim_wins(at(60), window, &[running]));
        // Its replica died: the lease ran out, the claim no longer blocks.
        assert!(startup_claim_wins(at(101), window, &[running]));
    }
}
