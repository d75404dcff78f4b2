static OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-ebpf"));
use aya::programs::Program;
fn main() {
    let mut ebpf = aya::Ebpf::load(OBJ).unwrap();
    for (name, p) in ebpf.programs_mut() {
        println!("{name}");
        let r = match p { Program::SchedClassifier(p) => p.load(), Program::CgroupSockAddr(p) => p.load(), Program::CgroupSkb(p) => p.load(), _ => panic!() };
        r.unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    println!("ok");
}
