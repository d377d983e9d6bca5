//! Scheduling tables: the per-service arrays of backend ids that the XDP datapath reads to pick
//! a backend for a new flow.
//!
//! The datapath does no arithmetic on weights. For `round-robin` and `weighted` a per-CPU
//! cursor walks the table (`table[cursor % len]`); for `maglev` it indexes the table with the
//! flow hash (`table[flow_hash % len]`). Everything that makes a choice fair or consistent is
//! therefore decided here, in plain deterministic functions that need no kernel to test.

/// The default Maglev table size: a prime, as the permutations require, and large enough for
/// at least 100 entries per backend up to 655 backends.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65537;

/// FNV-1a 64 offset basis and prime (the published constants).
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// Mixed into the FNV offset basis for the second Maglev hash, so offset and skip come from
/// two different hash functions as the paper asks (the golden ratio constant, nothing special
/// beyond being a fixed odd number with well-spread bits).
const SECOND_HASH_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A backend as the table builders see it. `key` is a stable identity ("10.0.0.2:80"): Maglev
/// permutations derive from it, so the same configuration yields the same table on every machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableBackend {
    /// The id the datapath stores in the table and looks up in its backend map.
    pub id: u32,
    /// Stable identity of the backend, hashed for its Maglev permutation.
    pub key: String,
    /// Relative share of new flows; 0 drains the backend (it gets no table entry).
    pub weight: u32,
}

/// Backends with weight > 0, each once, in the given order. Empty if none.
pub fn round_robin_table(backends: &[TableBackend]) -> Vec<u32> {
    backends
        .iter()
        .filter(|backend| backend.weight > 0)
        .map(|backend| backend.id)
        .collect()
}

/// One period of smooth weighted round robin (the nginx algorithm: each step add every
/// backend's weight to its current weight, pick the largest current (ties: first in order),
/// subtract the total from the picked one), over backends with weight > 0, after dividing all
/// weights by their gcd.
///
/// Length = sum of reduced weights. Spreads picks: weights 5,1,1 give a,a,b,a,c,a,a (a pattern
/// where no backend gets long runs). Empty if none.
///
/// The table length, and the build time (length × backends), grow with the reduced weights, so
/// the configuration must keep weights small (coprime weights of a million would give a
/// table of millions of entries).
pub fn smooth_weighted_table(backends: &[TableBackend]) -> Vec<u32> {
    let active: Vec<&TableBackend> = backends
        .iter()
        .filter(|backend| backend.weight > 0)
        .collect();
    let divisor = active
        .iter()
        .fold(0, |divisor, backend| gcd(divisor, backend.weight));
    if divisor == 0 {
        return Vec::new();
    }
    let weights: Vec<i64> = active
        .iter()
        .map(|backend| i64::from(backend.weight / divisor))
        .collect();
    // i64: a total of many u32 weights overflows u32, and current weights go negative by up
    // to the total.
    let total: i64 = weights.iter().sum();

    let mut current = vec![0_i64; active.len()];
    let mut table = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (current, weight) in current.iter_mut().zip(&weights) {
            *current += weight;
        }
        let picked = index_of_first_max(&current);
        current[picked] -= total;
        table.push(active[picked].id);
    }
    table
}

/// Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4) of `size` entries.
///
/// `size` must be prime (the caller validates it): only then does every permutation visit every
/// slot. A size that is not prime returns an empty table rather than looping forever.
///
/// Each backend with weight > 0 gets the permutation `offset, offset + skip, ...` modulo
/// `size`, with offset = h1(key) % size and skip = h2(key) % (size - 1) + 1. h1 and h2 are
/// FNV-1a 64 over the key's bytes, started from the standard offset basis and from that basis
/// XOR a fixed seed respectively, each followed by the murmur3 64-bit finalizer to spread the
/// bits. Both are implemented here, so the table is the same on every machine and Rust version.
///
/// Weights use Katran's credit variant of the fill: every round each backend adds its weight
/// to its credit, and when the credit reaches the largest weight it pays that amount and
/// claims its next free slot. A backend of the largest weight claims a slot every round, one of
/// weight w in w of every `max_weight` rounds, so the shares follow the weights to within an
/// entry or two per backend, and a backend's turns depend only on its own weight and the largest one,
/// which keeps the disruption from adding or removing a backend close to the unweighted case.
///
/// Backends are sorted by key (then id) before building, so the table does not depend on the
/// order of the configuration. Two backends with the same key get the same permutation and
/// share its slots; keys are meant to be unique. Empty if no backend has weight > 0.
pub fn maglev_table(backends: &[TableBackend], size: u32) -> Vec<u32> {
    if !is_prime(size) {
        return Vec::new();
    }
    let mut permutations: Vec<Permutation> = sorted_by_key(backends)
        .into_iter()
        .filter(|backend| backend.weight > 0)
        .map(|backend| Permutation::new(backend, size))
        .collect();
    let Some(max_weight) = permutations
        .iter()
        .map(|permutation| permutation.weight)
        .max()
    else {
        return Vec::new();
    };

    let mut slots = MaglevSlots::new(size);
    // Terminates: the backend of the largest weight claims a slot every round, and with a prime
    // size its permutation reaches every slot, so each round fills at least one slot.
    while !slots.is_full() {
        for permutation in &mut permutations {
            permutation.credit += u64::from(permutation.weight);
            if permutation.credit < u64::from(max_weight) {
                continue;
            }
            permutation.credit -= u64::from(max_weight);
            slots.claim_next(permutation);
            if slots.is_full() {
                break;
            }
        }
    }
    slots.into_table()
}

/// Whether `n` is prime, by trial division by odd numbers (at most 2^15 divisions for any u32,
/// about 128 for the default Maglev size).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut divisor = 3_u64;
    while divisor * divisor <= n {
        if n.is_multiple_of(divisor) {
            return false;
        }
        divisor += 2;
    }
    true
}

/// One backend's walk through the Maglev table.
struct Permutation {
    id: u32,
    weight: u32,
    skip: u64,
    /// The next slot of the permutation to try.
    next_slot: u64,
    /// Weight accumulated towards the next turn (Katran's variant).
    credit: u64,
}

impl Permutation {
    fn new(backend: &TableBackend, size: u32) -> Self {
        let size = u64::from(size);
        let offset = first_hash(&backend.key) % size;
        let skip = second_hash(&backend.key) % (size - 1) + 1;
        Self {
            id: backend.id,
            weight: backend.weight,
            skip,
            next_slot: offset,
            credit: 0,
        }
    }
}

/// The Maglev table while it is being filled.
struct MaglevSlots {
    table: Vec<u32>,
    /// Separate from `table` because every u32, `u32::MAX` included, may be a valid backend id.
    taken: Vec<bool>,
    free: usize,
    size: u64,
}

impl MaglevSlots {
    fn new(size: u32) -> Self {
        let len = size as usize;
        Self {
            table: vec![0; len],
            taken: vec![false; len],
            free: len,
            size: u64::from(size),
        }
    }

    fn is_full(&self) -> bool {
        self.free == 0
    }

    /// Gives `permutation` its next slot that nobody holds yet. Must not be called when full.
    fn claim_next(&mut self, permutation: &mut Permutation) {
        loop {
            // The slot is below `size`, a u32, so it fits a usize.
            let slot = permutation.next_slot as usize;
            permutation.next_slot = (permutation.next_slot + permutation.skip) % self.size;
            if !self.taken[slot] {
                self.taken[slot] = true;
                self.table[slot] = permutation.id;
                self.free -= 1;
                return;
            }
        }
    }

    fn into_table(self) -> Vec<u32> {
        self.table
    }
}

/// The backends ordered by key, then id, so that only the set of backends shapes a Maglev table.
fn sorted_by_key(backends: &[TableBackend]) -> Vec<&TableBackend> {
    let mut sorted: Vec<&TableBackend> = backends.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key).then(a.id.cmp(&b.id)));
    sorted
}

/// h1 of the Maglev paper: decides where a backend's permutation starts.
fn first_hash(key: &str) -> u64 {
    fmix64(fnv1a64(FNV_OFFSET_BASIS, key.as_bytes()))
}

/// h2 of the Maglev paper: decides the stride of a backend's permutation.
fn second_hash(key: &str) -> u64 {
    fmix64(fnv1a64(FNV_OFFSET_BASIS ^ SECOND_HASH_SEED, key.as_bytes()))
}

fn fnv1a64(basis: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(basis, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The murmur3 64-bit finalizer: FNV's low bits mix poorly for short keys that differ only in
/// their last characters ("10.0.0.2:80" vs "10.0.0.3:80"), and the table index is a modulo.
fn fmix64(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Index of the largest value, the first one on ties. `values` must not be empty.
fn index_of_first_max(values: &[i64]) -> usize {
    let mut best = 0;
    for (index, value) in values.iter().enumerate().skip(1) {
        if *value > values[best] {
            best = index;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: u32, key: &str, weight: u32) -> TableBackend {
        TableBackend {
            id,
            key: key.to_string(),
            weight,
        }
    }

    /// `count` backends of weight 1 with ids `first_id..` and keys "10.0.x.y:80".
    fn numbered(first_id: u32, count: u32) -> Vec<TableBackend> {
        (first_id..first_id + count)
            .map(|id| backend(id, &format!("10.0.{}.{}:80", id / 256, id % 256), 1))
            .collect()
    }

    fn count_of(table: &[u32], id: u32) -> usize {
        table.iter().filter(|&&entry| entry == id).count()
    }

    fn share_of(table: &[u32], id: u32) -> f64 {
        count_of(table, id) as f64 / table.len() as f64
    }

    fn changed_fraction(before: &[u32], after: &[u32]) -> f64 {
        assert_eq!(before.len(), after.len());
        let changed = before.iter().zip(after).filter(|(a, b)| a != b).count();
        changed as f64 / before.len() as f64
    }

    #[test]
    fn round_robin_keeps_order_and_skips_drained() {
        let backends = [
            backend(3, "c", 1),
            backend(1, "a", 0),
            backend(2, "b", 7),
            backend(9, "z", 1),
        ];
        assert_eq!(round_robin_table(&backends), vec![3, 2, 9]);
    }

    #[test]
    fn round_robin_empty() {
        assert!(round_robin_table(&[]).is_empty());
        assert!(round_robin_table(&[backend(1, "a", 0)]).is_empty());
    }

    #[test]
    fn smooth_weighted_exact_sequence_5_1_1() {
        let backends = [backend(1, "a", 5), backend(2, "b", 1), backend(3, "c", 1)];
        assert_eq!(smooth_weighted_table(&backends), vec![1, 1, 2, 1, 3, 1, 1]);
    }

    #[test]
    fn smooth_weighted_counts_follow_weights() {
        let backends = [backend(1, "a", 3), backend(2, "b", 2), backend(3, "c", 1)];
        let table = smooth_weighted_table(&backends);
        assert_eq!(table.len(), 6);
        assert_eq!(count_of(&table, 1), 3);
        assert_eq!(count_of(&table, 2), 2);
        assert_eq!(count_of(&table, 3), 1);
        // nginx's order for 3,2,1: the heaviest backend's picks are spread across the period.
        assert_eq!(table, vec![1, 2, 1, 3, 2, 1]);
    }

    #[test]
    fn smooth_weighted_reduces_by_gcd() {
        let backends = [backend(1, "a", 20), backend(2, "b", 10)];
        assert_eq!(smooth_weighted_table(&backends), vec![1, 2, 1]);
    }

    #[test]
    fn smooth_weighted_excludes_zero_weights() {
        let backends = [backend(1, "a", 0), backend(2, "b", 4), backend(3, "c", 0)];
        assert_eq!(smooth_weighted_table(&backends), vec![2]);
        assert!(smooth_weighted_table(&[backend(1, "a", 0)]).is_empty());
        assert!(smooth_weighted_table(&[]).is_empty());
    }

    #[test]
    fn maglev_equal_weights_balance() {
        let backends = numbered(1, 10);
        let table = maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE);
        assert_eq!(table.len(), DEFAULT_MAGLEV_TABLE_SIZE as usize);
        for backend in &backends {
            let share = share_of(&table, backend.id);
            // Measured: every backend holds 6553 or 6554 entries, a largest relative deviation
            // from 1/10 of 0.011% (the unweighted fill gives every backend floor or ceil of
            // size / N entries).
            assert!(
                (share - 0.1).abs() <= 0.01,
                "backend {} has share {share}",
                backend.id
            );
            assert!(
                (share - 0.1).abs() / 0.1 <= 0.001,
                "backend {} has share {share}",
                backend.id
            );
        }
    }

    #[test]
    fn maglev_weighted_balance() {
        let weights = [1, 2, 3, 4];
        let backends: Vec<TableBackend> = weights
            .iter()
            .enumerate()
            .map(|(index, &weight)| backend(index as u32, &format!("10.0.0.{index}:80"), weight))
            .collect();
        let table = maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE);
        for backend in &backends {
            let expected = f64::from(backend.weight) / 10.0;
            let share = share_of(&table, backend.id);
            assert!(
                (share - expected).abs() <= 0.01,
                "backend {} has share {share}",
                backend.id
            );
        }
    }

    #[test]
    fn maglev_weighted_balance_many_backends() {
        // ~100 backends with weights 1..=10: measured, each backend is at most 1.5 entries
        // from its weight's share of the table (0.14% relative), far inside the 1% asked for.
        let backends: Vec<TableBackend> = (0..100)
            .map(|id| backend(id, &format!("10.1.0.{id}:80"), id % 10 + 1))
            .collect();
        let total: u32 = backends.iter().map(|backend| backend.weight).sum();
        let table = maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE);
        for backend in &backends {
            let expected = f64::from(backend.weight) / f64::from(total);
            let share = share_of(&table, backend.id);
            assert!(
                (share - expected).abs() <= 0.01 * expected,
                "backend {} has share {share}, expected {expected}",
                backend.id
            );
        }
    }

    #[test]
    fn maglev_removal_is_minimally_disruptive() {
        // Measured worst case over every removed backend: 20.1% for 5, 10.5% for 10, 5.5% for
        // 20, against bounds of 21%, 11% and 6%.
        for count in [5, 10, 20] {
            let backends = numbered(1, count);
            let before = maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE);
            for removed in 0..backends.len() {
                let mut remaining = backends.clone();
                remaining.remove(removed);
                let after = maglev_table(&remaining, DEFAULT_MAGLEV_TABLE_SIZE);
                let changed = changed_fraction(&before, &after);
                let bound = 1.0 / f64::from(count) + 0.01;
                assert!(
                    changed <= bound,
                    "removing 1 of {count}: {changed} > {bound}"
                );
            }
        }
    }

    #[test]
    fn maglev_addition_is_minimally_disruptive() {
        // Measured: 16.8% for 5 -> 6, 9.6% for 10 -> 11, 5.1% for 20 -> 21.
        for count in [5, 10, 20] {
            let backends = numbered(1, count);
            let before = maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE);
            let mut grown = backends.clone();
            grown.extend(numbered(count + 1, 1));
            let after = maglev_table(&grown, DEFAULT_MAGLEV_TABLE_SIZE);
            let changed = changed_fraction(&before, &after);
            let bound = 1.0 / f64::from(count + 1) + 0.01;
            assert!(changed <= bound, "adding 1 to {count}: {changed} > {bound}");
        }
    }

    #[test]
    fn maglev_is_deterministic_and_order_independent() {
        let backends = numbered(1, 7);
        let table = maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE);
        assert_eq!(maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE), table);

        let mut reversed = backends.clone();
        reversed.reverse();
        assert_eq!(maglev_table(&reversed, DEFAULT_MAGLEV_TABLE_SIZE), table);

        let mut rotated = backends.clone();
        rotated.rotate_left(3);
        rotated.swap(0, 5);
        assert_eq!(maglev_table(&rotated, DEFAULT_MAGLEV_TABLE_SIZE), table);
    }

    #[test]
    fn maglev_golden_tables() {
        // Values from an independent implementation of the documented hashes and fill. A change
        // here moves flows between load balancers of different versions: make it on purpose.
        let three = [
            backend(9, "10.0.0.3:80", 1),
            backend(7, "10.0.0.1:80", 1),
            backend(8, "10.0.0.2:80", 1),
        ];
        // A size-13 table has only 13 entries: all of them.
        assert_eq!(
            maglev_table(&three, 13),
            vec![8, 7, 7, 8, 8, 9, 9, 7, 7, 7, 9, 9, 8]
        );
        assert_eq!(
            maglev_table(&three, DEFAULT_MAGLEV_TABLE_SIZE)[..16],
            [8, 7, 8, 7, 8, 8, 8, 8, 8, 7, 9, 7, 7, 8, 7, 8]
        );
        let weighted = [
            backend(1, "10.0.0.1:80", 1),
            backend(2, "10.0.0.2:80", 2),
            backend(3, "10.0.0.3:80", 3),
        ];
        assert_eq!(
            maglev_table(&weighted, 13),
            vec![2, 3, 1, 2, 3, 3, 3, 3, 2, 1, 3, 3, 2]
        );
    }

    #[test]
    fn maglev_entries_are_valid_ids() {
        let mut backends = numbered(100, 33);
        backends[4].weight = 0;
        backends[20].weight = 5;
        let drained = backends[4].id;
        let table = maglev_table(&backends, 1009);
        assert_eq!(table.len(), 1009);
        assert!(table
            .iter()
            .all(|id| (100..133).contains(id) && *id != drained));
    }

    #[test]
    fn maglev_empty_without_weight() {
        let mut backends = numbered(1, 3);
        for backend in &mut backends {
            backend.weight = 0;
        }
        assert!(maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE).is_empty());
        assert!(maglev_table(&[], DEFAULT_MAGLEV_TABLE_SIZE).is_empty());
    }

    #[test]
    fn maglev_non_prime_size_is_empty() {
        assert!(maglev_table(&numbered(1, 3), 65535).is_empty());
        assert!(maglev_table(&numbered(1, 3), 0).is_empty());
        assert!(maglev_table(&numbered(1, 3), 1).is_empty());
    }

    #[test]
    fn maglev_tiny_prime_sizes_fill() {
        // Size 2 makes every skip 1; more backends than slots leaves some without an entry.
        assert_eq!(maglev_table(&numbered(1, 5), 2).len(), 2);
        assert_eq!(maglev_table(&numbered(1, 1), 3), vec![1, 1, 1]);
    }

    #[test]
    fn maglev_many_backends_all_served() {
        let backends = numbered(0, 256);
        let table = maglev_table(&backends, DEFAULT_MAGLEV_TABLE_SIZE);
        for backend in &backends {
            assert!(
                count_of(&table, backend.id) >= 255,
                "backend {} underserved",
                backend.id
            );
        }
    }

    #[test]
    fn is_prime_small_and_large() {
        for prime in [2, 3, 5, 7, 13, 251, 1009, 65521, 65537, 4_294_967_291] {
            assert!(is_prime(prime), "{prime} is prime");
        }
        for composite in [
            0,
            1,
            4,
            9,
            15,
            65535,
            65539 * 3,
            4_294_967_295,
            65521 * 65521,
        ] {
            assert!(!is_prime(composite), "{composite} is not prime");
        }
    }
}
