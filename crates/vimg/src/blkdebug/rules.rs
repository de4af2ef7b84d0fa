//! The rules of a blkdebug layer: parsed from a config file or from option pairs, and the
//! state machine that events drive and requests are checked against.

use std::io;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// A request's kind, as blkdebug's `iotype` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    /// `read`
    Read,
    /// `write`
    Write,
    /// `write-zeroes`
    WriteZeroes,
    /// `discard`
    Discard,
    /// `flush`
    Flush,
    /// `block-status`
    BlockStatus,
}

impl IoType {
    fn from_name(s: &str) -> Option<IoType> {
        Some(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// Every type but block-status: what a rule without `iotype` fails.
    const DEFAULT_MASK: u8 = 0b01_1111;
}

macro_rules! events {
    ($($v:ident = $n:literal,)*) => {
        /// A point in a driver's work that rules wait for (QEMU's `BlkdebugEvent`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Event { $(
            #[doc = concat!("`", $n, "`")]
            $v,
        )* }

        impl Event {
            /// The name rules use.
            pub fn name(self) -> &'static str {
                match self { $(Event::$v => $n,)* }
            }

            /// The event a rule names.
            pub fn from_name(s: &str) -> Option<Event> {
                match s { $($n => Some(Event::$v),)* _ => None }
            }
        }
    };
}

events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

#[derive(Clone, Debug)]
enum Action {
    Inject {
        errno: i32,
        once: bool,
        /// Byte offset of the sector a request must cover; `None`: any request.
        offset: Option<u64>,
        iotypes: u8,
    },
    SetState {
        new_state: i64,
    },
}

#[derive(Clone, Debug)]
struct Rule {
    event: Event,
    /// 0: in any state.
    state: i64,
    action: Action,
}

/// Which section a group of keys came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Section {
    InjectError,
    SetState,
}

impl Section {
    fn from_name(s: &str) -> Option<Section> {
        match s {
            "inject-error" => Some(Section::InjectError),
            "set-state" => Some(Section::SetState),
            _ => None,
        }
    }
}

/// One `[section]` of keys, before it is checked.
pub(crate) type RawRule = (Section, Vec<(String, String)>);

#[derive(Debug)]
struct State {
    state: i64,
    /// Indices of the active inject rules, first match first.
    active: Vec<usize>,
    /// Rules a `once` error used up.
    removed: Vec<bool>,
}

/// A blkdebug layer's rules and state. Shared by the storage and reader that inject.
#[derive(Debug)]
pub struct Blkdebug {
    rules: Vec<Rule>,
    st: Mutex<State>,
    align: u64,
}

fn number(section: &str, key: &str, v: &str) -> Result<i64> {
    v.trim().parse::<i64>().map_err(|_| {
        Error::invalid_argument(format!(
            "Parameter '{key}' expects a number (in blkdebug rule [{section}])"
        ))
    })
}

fn boolean(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::invalid_argument(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

impl Blkdebug {
    /// Builds the layer from rules in the order given (config file first, then options), with
    /// `align` (0: none). Fires the `none` event, as opening the layer does in QEMU.
    pub(crate) fn new(raw: Vec<RawRule>, align: u64) -> Result<Blkdebug> {
        if align != 0 && (!align.is_power_of_two() || align >= i32::MAX as u64) {
            return Err(Error::invalid_argument(format!(
                "Cannot meet constraints with align {align}"
            )));
        }
        // QEMU adds all inject-error rules before all set-state rules.
        let mut ordered: Vec<&RawRule> =
            raw.iter().filter(|r| r.0 == Section::InjectError).collect();
        ordered.extend(raw.iter().filter(|r| r.0 == Section::SetState));
        let mut rules = Vec::new();
        for (section, keys) in ordered {
            let sname = match section {
                Section::InjectError => "inject-error",
                Section::SetState => "set-state",
            };
            let mut event = None;
            let mut state = 0i64;
            let (mut errno, mut once, mut sector, mut iotypes) =
                (libc::EIO as i64, false, None::<i64>, IoType::DEFAULT_MASK);
            let mut new_state = 0i64;
            for (k, v) in keys {
                match (section, k.as_str()) {
                    (_, "event") => {
                        event = Some(Event::from_name(v).ok_or_else(|| {
                            Error::invalid_argument(format!(
                                "Parameter 'event' does not accept value '{v}'"
                            ))
                        })?)
                    }
                    (_, "state") => state = number(sname, k, v)?,
                    (Section::InjectError, "errno") => errno = number(sname, k, v)?,
                    (Section::InjectError, "sector") => sector = Some(number(sname, k, v)?),
                    (Section::InjectError, "once") => once = boolean(k, v)?,
                    // Whether the error is returned at once or from a later callback:
                    // one and the same to a synchronous reader.
                    (Section::InjectError, "immediately") => {
                        boolean(k, v)?;
                    }
                    (Section::InjectError, "iotype") => {
                        iotypes = IoType::from_name(v)
                            .ok_or_else(|| {
                                Error::invalid_argument(format!(
                                    "Parameter 'iotype' does not accept value '{v}'"
                                ))
                            })?
                            .bit()
                    }
                    (Section::SetState, "new_state") => new_state = number(sname, k, v)?,
                    _ => return Err(Error::invalid_argument(format!("Invalid parameter '{k}'"))),
                }
            }
            let event =
                event.ok_or_else(|| Error::invalid_argument("Missing event name for rule"))?;
            let action = match section {
                Section::InjectError => Action::Inject {
                    errno: i32::try_from(errno)
                        .ok()
                        .filter(|e| *e >= 0)
                        .ok_or_else(|| {
                            Error::invalid_argument(format!(
                                "blkdebug errno {errno} is out of range"
                            ))
                        })?,
                    once,
                    offset: match sector {
                        None | Some(-1) => None,
                        Some(s) => Some(
                            u64::try_from(s)
                                .ok()
                                .and_then(|s| s.checked_mul(512))
                                .ok_or_else(|| {
                                    Error::invalid_argument(format!(
                                        "blkdebug sector {s} is out of range"
                                    ))
                                })?,
                        ),
                    },
                    iotypes,
                },
                Section::SetState => Action::SetState { new_state },
            };
            rules.push(Rule {
                event,
                state,
                action,
            });
        }
        let n = rules.len();
        let d = Blkdebug {
            rules,
            st: Mutex::new(State {
                state: 1,
                active: Vec::new(),
                removed: vec![false; n],
            }),
            align,
        };
        d.event(Event::None);
        Ok(d)
    }

    /// The `align` option (0 when not given).
    /// The events the rules wait for.
    pub(crate) fn events(&self) -> impl Iterator<Item = Event> + '_ {
        self.rules.iter().map(|r| r.event)
    }

    pub fn align(&self) -> u64 {
        self.align
    }

    /// An event happened: rules waiting for it in the current state act.
    pub fn event(&self, ev: Event) {
        let Ok(mut st) = self.st.lock() else { return };
        let old = st.state;
        let mut new = old;
        let mut injected = false;
        // QEMU walks its rule list newest first and puts each inject rule it activates at
        // the head of the active list: the active list ends up in the order the rules were
        // given, and of several set-state rules the first given wins.
        for (i, r) in self.rules.iter().enumerate().rev() {
            if r.event != ev || st.removed[i] || (r.state != 0 && r.state != old) {
                continue;
            }
            match r.action {
                Action::Inject { .. } => {
                    if !injected {
                        st.active.clear();
                        injected = true;
                    }
                    st.active.insert(0, i);
                }
                Action::SetState { new_state } => new = new_state,
            }
        }
        st.state = new;
    }

    /// Checks a request of `bytes` at `offset`: the error of the first active rule that
    /// covers it.
    pub fn check(&self, offset: u64, bytes: u64, io: IoType) -> io::Result<()> {
        let Ok(mut st) = self.st.lock() else {
            return Ok(());
        };
        let hit = st.active.iter().position(|&i| match self.rules[i].action {
            Action::Inject {
                offset: o, iotypes, ..
            } => {
                iotypes & io.bit() != 0
                    && o.is_none_or(|o| bytes > 0 && o >= offset && o - offset < bytes)
            }
            Action::SetState { .. } => false,
        });
        let Some(pos) = hit else { return Ok(()) };
        let i = st.active[pos];
        let Action::Inject { errno, once, .. } = self.rules[i].action else {
            return Ok(());
        };
        if errno == 0 {
            return Ok(());
        }
        if once {
            st.active.remove(pos);
            st.removed[i] = true;
        }
        Err(io::Error::from_raw_os_error(errno))
    }
}

/// Parses a blkdebug config file in QEMU's syntax: `[inject-error]` / `[set-state]` headers
/// and `key = "value"` lines; `#` starts a comment line.
pub(crate) fn parse_config(text: &str, name: &str) -> Result<Vec<RawRule>> {
    let mut out: Vec<RawRule> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let lineno = n + 1;
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let bad = || Error::invalid_argument(format!("{name}:{lineno}: parse error"));
        if let Some(h) = l.strip_prefix('[') {
            let h = h.strip_suffix(']').ok_or_else(bad)?;
            // `[group "id"]` names an instance; blkdebug ignores the id.
            let group = h.split_whitespace().next().unwrap_or("");
            let section = Section::from_name(group).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "{name}:{lineno}: There is no option group '{group}'"
                ))
            })?;
            out.push((section, Vec::new()));
            continue;
        }
        let (k, v) = l.split_once('=').ok_or_else(bad)?;
        let k = k.trim();
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(bad)?;
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(bad());
        }
        let Some(cur) = out.last_mut() else {
            return Err(Error::invalid_argument(format!(
                "{name}:{lineno}: no group defined"
            )));
        };
        cur.1.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_rules_fire_on_their_event() {
        let raw = parse_config(
            "# c\n[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\nonce = \"on\"\n",
            "x",
        )
        .unwrap();
        let d = Blkdebug::new(raw, 0).unwrap();
        d.check(0, 512, IoType::Read).unwrap();
        d.event(Event::ReadAio);
        let e = d.check(0, 512, IoType::Read).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        // once: gone after the first error.
        d.check(0, 512, IoType::Read).unwrap();
        d.event(Event::ReadAio);
        d.check(0, 512, IoType::Read).unwrap();
    }

    #[test]
    fn none_rules_are_active_from_the_start_and_sector_and_type_select() {
        let raw = vec![(
            Section::InjectError,
            vec![
                ("event".into(), "none".into()),
                ("iotype".into(), "block-status".into()),
                ("sector".into(), "4".into()),
            ],
        )];
        let d = Blkdebug::new(raw, 0).unwrap();
        d.check(0, 2048, IoType::Read).unwrap();
        d.check(0, 2048, IoType::BlockStatus).unwrap();
        assert!(d.check(0, 2049, IoType::BlockStatus).is_err());
        assert!(d.check(2048, 512, IoType::BlockStatus).is_err());
        d.check(2048, 0, IoType::BlockStatus).unwrap();
    }

    #[test]
    fn set_state_gates_rules() {
        let raw = vec![
            (
                Section::InjectError,
                vec![
                    ("event".into(), "write_aio".into()),
                    ("state".into(), "2".into()),
                ],
            ),
            (
                Section::SetState,
                vec![
                    ("event".into(), "l1_update".into()),
                    ("new_state".into(), "2".into()),
                ],
            ),
        ];
        let d = Blkdebug::new(raw, 0).unwrap();
        d.event(Event::WriteAio);
        d.check(0, 512, IoType::Write).unwrap();
        d.event(Event::L1Update);
        d.event(Event::WriteAio);
        assert_eq!(
            d.check(0, 512, IoType::Write).unwrap_err().raw_os_error(),
            Some(5)
        );
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(parse_config("[bogus]\n", "x").is_err());
        assert!(parse_config("[inject-error]\nevent = read_aio\n", "x").is_err());
        assert!(parse_config("event = \"x\"\n", "x").is_err());
        let raw = parse_config("[inject-error]\nevent = \"nope\"\n", "x").unwrap();
        assert!(Blkdebug::new(raw, 0).is_err());
        assert!(Blkdebug::new(Vec::new(), 3).is_err());
    }
}
