//! Priority levels: how the bureau budget is split between kinds of work (issue 17).
//!
//! A customer at a bank's counter must not wait behind the bank's overnight pre-screen. Each
//! level (`interactive`, `batch`: the names and count are the operator's) has a *nominal* part
//! of the budget, in proportion to its `share`; under contention every level with waiters gets
//! at least its nominal part. What a level leaves idle is *lent* to the others (work-conserving)
//! except the part it keeps back (`1 - lendable`), and a level may *borrow* above its nominal
//! part up to `borrow` times it. This is Kubernetes API Priority and Fairness's model (nominal
//! concurrency shares, lendable percent, borrowing limit percent), computed per grant from the
//! calls in flight rather than re-balanced periodically: a freed slot goes first to the level
//! furthest below its nominal part, then to the borrower furthest below it. Nothing is
//! pre-empted: a level that lent its idle slots gets them back as the borrowed calls end (its
//! requests wait for the next completion, as a sparse tenant's do).
//!
//! Levels live in fixed slots (at most [`MAX_LEVELS`]), and a level keeps its slot by name
//! across reloads ([`LevelTable::place`]): a reload that reorders, adds or removes levels never
//! relabels a queued waiter or a permit in flight (an `interactive` call counted as `batch`).

/// Most priority levels a scheduler holds.
pub const MAX_LEVELS: usize = 8;

/// One level's part of the budget, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelSpec {
    /// Relative nominal share of the budget (at least 1).
    pub share: u32,
    /// Fraction of its nominal part it lends to other levels while idle, in `[0, 1]`.
    pub lendable: f64,
    /// Most it may borrow above its nominal part, as a fraction of it; `None`: up to the
    /// whole budget.
    pub borrow: Option<f64>,
}

impl LevelSpec {
    /// The one level of a scheduler configured without levels: the whole budget.
    pub const WHOLE: LevelSpec = LevelSpec { share: 1, lendable: 1.0, borrow: None };
}

/// The levels in force: a spec per slot in use, and their order (most important first, as
/// declared), which breaks ties and decides who is shed first.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelTable {
    specs: [Option<LevelSpec>; MAX_LEVELS],
    /// The name of the level in each slot (`None`: unnamed, as in [`LevelTable::new`]).
    names: [Option<Box<str>>; MAX_LEVELS],
    /// Slots in use, most important first.
    order: Vec<usize>,
}

impl Default for LevelTable {
    fn default() -> LevelTable {
        LevelTable::new(&[(0, LevelSpec::WHOLE)]).expect("one level in slot 0")
    }
}

/// One level's seats under a given limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seats {
    /// Its nominal part of the limit.
    pub nominal: usize,
    /// The part of `nominal` it does not lend while idle.
    pub reserved: usize,
    /// Most it may hold: `nominal` plus what it may borrow.
    pub max: usize,
}

impl LevelTable {
    /// Levels in `slots` (slot index, spec), most important first. Errors on a slot out of
    /// range or used twice, or on no level at all.
    pub fn new(levels: &[(usize, LevelSpec)]) -> Result<LevelTable, String> {
        let mut specs = [None; MAX_LEVELS];
        let mut order = Vec::with_capacity(levels.len());
        for &(slot, spec) in levels {
            if slot >= MAX_LEVELS {
                return Err(format!("level slot {slot} out of range (at most {MAX_LEVELS} levels)"));
            }
            if specs[slot].is_some() {
                return Err(format!("level slot {slot} used twice"));
            }
            let spec = LevelSpec {
                share: spec.share.max(1),
                lendable: if spec.lendable.is_finite() { spec.lendable.clamp(0.0, 1.0) } else { 1.0 },
                borrow: spec.borrow.filter(|b| b.is_finite()).map(|b| b.max(0.0)),
            };
            specs[slot] = Some(spec);
            order.push(slot);
        }
        if order.is_empty() {
            return Err("no priority level".to_string());
        }
        Ok(LevelTable { specs, names: Default::default(), order })
    }

    /// The named levels `levels` (most important first), each in the slot it had in `previous`
    /// by name; a new name takes a free slot, preferring one nothing is counted in
    /// (`busy(slot)`: permits held or waiters queued there) and that `previous` did not use,
    /// so a removed level's calls still in flight are not counted as the new one's. Returns
    /// the table and each level's slot, in `levels`' order. Errors on more than
    /// [`MAX_LEVELS`] levels or none.
    pub fn place(
        previous: &LevelTable,
        levels: &[(&str, LevelSpec)],
        busy: &dyn Fn(usize) -> bool,
    ) -> Result<(LevelTable, Vec<usize>), String> {
        if levels.len() > MAX_LEVELS {
            return Err(format!("{} levels; at most {MAX_LEVELS}", levels.len()));
        }
        let kept = |name: &str| (0..MAX_LEVELS).find(|&s| previous.names[s].as_deref() == Some(name));
        let mut taken = [false; MAX_LEVELS];
        let mut slots: Vec<Option<usize>> = levels.iter().map(|(name, _)| kept(name)).collect();
        for s in slots.iter().flatten() {
            taken[*s] = true;
        }
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            let free = (0..MAX_LEVELS)
                .filter(|&s| !taken[s])
                .min_by_key(|&s| (busy(s), previous.names[s].is_some(), s))
                .expect("at most MAX_LEVELS levels, so a slot is free");
            taken[free] = true;
            *slot = Some(free);
        }
        let slots: Vec<usize> = slots.into_iter().map(|s| s.expect("every level placed")).collect();
        let specs: Vec<(usize, LevelSpec)> = slots.iter().zip(levels).map(|(&s, &(_, spec))| (s, spec)).collect();
        let mut table = LevelTable::new(&specs)?;
        for (&s, (name, _)) in slots.iter().zip(levels) {
            table.names[s] = Some(Box::from(*name));
        }
        Ok((table, slots))
    }

    /// The name of the level in `slot`, if it has one.
    pub fn name(&self, slot: usize) -> Option<&str> {
        self.names.get(slot).and_then(|n| n.as_deref())
    }

    /// Slots in use, most important first.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Whether `slot` holds a level.
    pub fn contains(&self, slot: usize) -> bool {
        self.specs.get(slot).is_some_and(Option::is_some)
    }

    /// Whether there is more than the one level that is the whole budget.
    pub fn is_split(&self) -> bool {
        self.order.len() > 1
    }

    /// Each slot's seats under `limit`: nominal parts in proportion to the shares (the
    /// remainder to the levels with the fewest, then by order; each level at least one seat
    /// while the limit allows), the kept-back part, and the borrowing cap.
    pub fn seats(&self, limit: usize) -> [Seats; MAX_LEVELS] {
        let mut seats = [Seats::default(); MAX_LEVELS];
        let total: u64 = self.order.iter().map(|&s| u64::from(self.spec(s).share)).sum();
        let mut given = 0;
        for &slot in &self.order {
            let n = (limit as u64 * u64::from(self.spec(slot).share) / total) as usize;
            seats[slot].nominal = n;
            given += n;
        }
        // Remainders: first to levels left with none (a tiny share still runs), then in order.
        let mut left = limit.saturating_sub(given);
        for pass in 0..2 {
            for &slot in &self.order {
                if left == 0 {
                    break;
                }
                if pass == 1 || seats[slot].nominal == 0 {
                    seats[slot].nominal += 1;
                    left -= 1;
                }
            }
        }
        for &slot in &self.order {
            let spec = self.spec(slot);
            let s = &mut seats[slot];
            s.reserved = s.nominal - (s.nominal as f64 * spec.lendable).floor() as usize;
            s.max = spec.borrow.map_or(usize::MAX, |b| s.nominal + (s.nominal as f64 * b).floor() as usize).max(1);
        }
        seats
    }

    fn spec(&self, slot: usize) -> LevelSpec {
        self.specs[slot].unwrap_or(LevelSpec::WHOLE)
    }
}

/// Whether level `slot`, which holds `held[slot]` calls, may take one more when `total` calls
/// (this one included) would then be in flight under `limit`: below its nominal part always;
/// above it only within its borrowing cap and without using what the other levels keep back.
pub fn may_take(
    seats: &[Seats; MAX_LEVELS],
    held: &[usize; MAX_LEVELS],
    slot: usize,
    total: usize,
    limit: usize,
) -> bool {
    let own = held[slot];
    if own < seats[slot].nominal {
        return true;
    }
    if own >= seats[slot].max {
        return false;
    }
    let kept: usize = (0..MAX_LEVELS).filter(|&j| j != slot).map(|j| seats[j].reserved.saturating_sub(held[j])).sum();
    // What the others keep back never takes a level's last seat: under a limit smaller than
    // the levels (an adaptive `min` of 1, a budget split among replicas) a level with no
    // nominal seat would otherwise wait forever on an idle bureau.
    let kept = kept.min(limit.saturating_sub(seats[slot].nominal.max(1)));
    total + kept <= limit
}

/// Among the levels with waiters (`waiting[slot] > 0`), the one a freed slot goes to when
/// `total` calls (that one included) would be in flight under `limit`: the level furthest
/// below its nominal part, else the borrower furthest below it; ties go by order. `None` if
/// no level with waiters may take it.
pub fn choose(
    table: &LevelTable,
    seats: &[Seats; MAX_LEVELS],
    held: &[usize; MAX_LEVELS],
    waiting: &[usize; MAX_LEVELS],
    total: usize,
    limit: usize,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    for &slot in table.order() {
        if waiting[slot] == 0 || !may_take(seats, held, slot, total, limit) {
            continue;
        }
        // held / nominal, compared by cross-multiplying (a nominal of 0 is the furthest
        // above it: it only ever borrows).
        let further_below = |a: usize, b: usize| {
            let (ha, na) = (held[a] as u128, seats[a].nominal as u128);
            let (hb, nb) = (held[b] as u128, seats[b].nominal as u128);
            match (na, nb) {
                (0, 0) => false,
                (0, _) => false,
                (_, 0) => true,
                _ => ha * nb < hb * na,
            }
        };
        best = match best {
            Some(b) if !further_below(slot, b) => Some(b),
            _ => Some(slot),
        };
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(specs: &[LevelSpec]) -> LevelTable {
        let levels: Vec<(usize, LevelSpec)> = specs.iter().copied().enumerate().collect();
        LevelTable::new(&levels).expect("valid levels")
    }

    fn level(share: u32, lendable: f64, borrow: Option<f64>) -> LevelSpec {
        LevelSpec { share, lendable, borrow }
    }

    #[test]
    fn nominal_parts_follow_the_shares_and_add_up_to_the_limit() {
        let t = table(&[level(7, 1.0, None), level(3, 1.0, None)]);
        let s = t.seats(8);
        assert_eq!((s[0].nominal, s[1].nominal), (6, 2));
        let s = t.seats(10);
        assert_eq!((s[0].nominal, s[1].nominal), (7, 3));
        // A tiny share still gets a seat.
        let t = table(&[level(99, 1.0, None), level(1, 1.0, None)]);
        let s = t.seats(8);
        assert_eq!((s[0].nominal, s[1].nominal), (7, 1));
        for limit in 0..50 {
            let s = t.seats(limit);
            assert_eq!(s[0].nominal + s[1].nominal, limit);
        }
    }

    #[test]
    fn below_nominal_always_above_only_within_the_borrowing_cap_and_what_others_keep() {
        // 8 seats: interactive 6 (keeps 3 back: lends half), batch 2 (borrows up to 2x more).
        let t = table(&[level(3, 0.5, None), level(1, 1.0, Some(2.0))]);
        let s = t.seats(8);
        assert_eq!((s[0].nominal, s[0].reserved, s[1].nominal, s[1].max), (6, 3, 2, 6));
        let held = |a, b| {
            let mut h = [0; MAX_LEVELS];
            h[0] = a;
            h[1] = b;
            h
        };
        // Batch below its nominal part.
        assert!(may_take(&s, &held(6, 1), 1, 8, 8));
        // Batch borrowing while interactive is idle: up to 8 - 3 kept back = 5.
        assert!(may_take(&s, &held(0, 4), 1, 5, 8));
        assert!(!may_take(&s, &held(0, 5), 1, 6, 8), "used what interactive keeps back");
        // Interactive busy beyond what it keeps: batch may borrow what is left, up to its cap.
        assert!(may_take(&s, &held(3, 4), 1, 8, 8));
        assert!(!may_take(&s, &held(1, 6), 1, 8, 8), "past its borrowing cap");
        // Interactive borrows without a cap.
        assert!(may_take(&s, &held(7, 0), 0, 8, 8));
    }

    #[test]
    fn under_a_limit_smaller_than_the_levels_an_idle_bureau_still_serves_each() {
        // Limit 1: interactive (keeping half back) has the one nominal seat, batch none. With
        // interactive idle, batch must still get the free seat.
        let t = table(&[level(3, 0.5, None), level(1, 1.0, None)]);
        let s = t.seats(1);
        assert_eq!((s[0].nominal, s[0].reserved, s[1].nominal), (1, 1, 0));
        assert!(may_take(&s, &[0; MAX_LEVELS], 1, 1, 1), "batch starved on an idle bureau");
        // With a larger limit what interactive keeps back still holds.
        let s = t.seats(8);
        let mut held = [0; MAX_LEVELS];
        held[1] = 5;
        assert!(!may_take(&s, &held, 1, 6, 8));
    }

    #[test]
    fn a_level_keeps_its_slot_by_name_and_a_new_one_avoids_busy_and_recent_slots() {
        let whole = LevelSpec::WHOLE;
        let none = |_: usize| false;
        let (first, slots) =
            LevelTable::place(&LevelTable::default(), &[("interactive", whole), ("batch", whole)], &none)
                .expect("two levels");
        assert_eq!(slots, [0, 1]);
        // Reordered: same slots, the new order.
        let (second, slots) =
            LevelTable::place(&first, &[("batch", whole), ("interactive", whole)], &none).expect("reordered");
        assert_eq!(slots, [1, 0]);
        assert_eq!(second.order(), [1, 0]);
        assert_eq!((second.name(0), second.name(1)), (Some("interactive"), Some("batch")));
        // Batch removed while its calls are in flight, a new level added: it takes neither the
        // busy slot 1 nor a slot of the previous table.
        let (third, slots) =
            LevelTable::place(&second, &[("interactive", whole), ("bulk", whole)], &|s| s == 1).expect("renamed");
        assert_eq!(slots, [0, 2]);
        assert!(!third.contains(1));
        // Eight levels fill every slot; a ninth is an error.
        let names: Vec<String> = (0..9).map(|i| format!("l{i}")).collect();
        let eight: Vec<(&str, LevelSpec)> = names[..8].iter().map(|n| (n.as_str(), whole)).collect();
        let (_, slots) = LevelTable::place(&third, &eight, &|_| true).expect("eight levels");
        let mut sorted = slots.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
        let nine: Vec<(&str, LevelSpec)> = names.iter().map(|n| (n.as_str(), whole)).collect();
        assert!(LevelTable::place(&third, &nine, &none).is_err());
    }

    #[test]
    fn a_freed_slot_goes_to_the_level_furthest_below_its_nominal_part() {
        let t = table(&[level(3, 1.0, None), level(1, 1.0, None)]);
        let s = t.seats(8); // 6 and 2
        let mut held = [0; MAX_LEVELS];
        let mut waiting = [0; MAX_LEVELS];
        waiting[0] = 5;
        waiting[1] = 50;
        held[0] = 5; // 5 of 6
        held[1] = 2; // 2 of 2: at nominal
        assert_eq!(choose(&t, &s, &held, &waiting, 8, 8), Some(0));
        held[0] = 6;
        held[1] = 1;
        assert_eq!(choose(&t, &s, &held, &waiting, 8, 8), Some(1));
        // Both at nominal: the borrower furthest below it (6/6 vs 2/2 tie: order).
        held[1] = 2;
        assert_eq!(choose(&t, &s, &held, &waiting, 9, 9), Some(0));
        waiting[0] = 0;
        assert_eq!(choose(&t, &s, &held, &waiting, 9, 9), Some(1), "work-conserving: idle share is lent");
    }
}
