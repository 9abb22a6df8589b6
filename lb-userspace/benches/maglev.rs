//! Table build time for N backends and table size M. Run: cargo bench -p lb-userspace --bench maglev
use std::net::{Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use xlb::maglev::{build, WeightedBackend};

fn backends(n: u32) -> Vec<WeightedBackend> {
    (0..n)
        .map(|i| WeightedBackend {
            addr: SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 8080)),
            weight: 1,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build");
    g.sample_size(20);
    for m in [16381u32, 65537] {
        for n in [10u32, 100, 1000] {
            let bs = backends(n);
            g.bench_with_input(
                BenchmarkId::new(format!("M={m}"), format!("N={n}")),
                &bs,
                |b, bs| b.iter(|| build(bs, m).unwrap()),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
