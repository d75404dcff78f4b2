//! Kernel addresses to symbol names (`/proc/kallsyms`), for where a packet was dropped.

pub struct Kallsyms {
    /// Sorted by address.
    syms: Vec<(u64, String)>,
}

impl Kallsyms {
    /// Empty when the file is unreadable or addresses are hidden (kptr_restrict).
    pub fn load() -> Kallsyms {
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        Kallsyms::parse(&text)
    }

    pub fn parse(text: &str) -> Kallsyms {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                (addr != 0 && matches!(kind, "t" | "T")).then(|| (addr, name.to_owned()))
            })
            .collect();
        syms.sort_unstable();
        Kallsyms { syms }
    }

    /// `function+0xoffset`, or the bare address when unknown.
    pub fn resolve(&self, addr: u64) -> String {
        match self.syms.partition_point(|(a, _)| *a <= addr) {
            0 => format!("{addr:#x}"),
            i => {
                let (base, name) = &self.syms[i - 1];
                format!("{name}+{:#x}", addr - base)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_to_the_enclosing_function() {
        let k = Kallsyms::parse(
            "ffffffff81000000 T _stext\nffffffff81a00000 t nf_hook_slow\nffffffff81a00400 T ip_forward\nffffffff81a00200 d some_data\n",
        );
        assert_eq!(k.resolve(0xffffffff81a00010), "nf_hook_slow+0x10");
        assert_eq!(k.resolve(0xffffffff81a00400), "ip_forward+0x0");
        assert_eq!(k.resolve(0x10), "0x10");
    }
}
