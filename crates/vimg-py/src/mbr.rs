//! The rules a GPT disk's protective MBR must follow (UEFI 2.10, section 5.2.3,
//! "Protective MBR"), for the streaming `format_inspector`'s `gpt` inspector. A raw disk
//! carrying a GPT is still read as raw; these rules only say whether its first sector is
//! what a GPT disk's must be, so a disk with surprising partition entries is not waved
//! through as "gpt". Messages keep oslo's wording, which callers match on.

/// "0x55 0xAA" at bytes 510..512: the MBR boot signature.
pub const MBR_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// The four 16-byte partition entries start here.
const PTE_START: usize = 446;
/// OS type 0xEE: a GPT protective partition.
const OS_TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// FAT boot sector: number of FATs at 0x10, media descriptor at 0x15 (0xF8: fixed disk).
const FAT_NUM_FATS_AT: usize = 0x10;
const FAT_MEDIA_AT: usize = 0x15;
const FAT_MEDIA_FIXED_DISK: u8 = 0xF8;

/// True when `sector` (the first 512 bytes) has the MBR signature and is not a FAT boot
/// sector (which carries the same signature).
pub fn is_mbr(sector: &[u8]) -> bool {
    if sector.len() < 512 || sector[510..512] != MBR_SIGNATURE {
        return false;
    }
    let fat = sector[FAT_NUM_FATS_AT] == 2 && sector[FAT_MEDIA_AT] == FAT_MEDIA_FIXED_DISK;
    !fat
}

/// Checks the partition entries of an MBR: boot flags 0x00 or 0x80; a protective (0xEE)
/// entry starts at CHS 0/2/0 and LBA 1 and is the only entry; at least one entry is
/// used.
pub fn check_partitions(sector: &[u8]) -> Result<(), String> {
    if sector.len() < 512 {
        return Err(format!("MBR is {} bytes, not 512", sector.len()));
    }
    let mut used = Vec::new();
    let mut protective = false;
    for i in 0..4 {
        let e = &sector[PTE_START + 16 * i..PTE_START + 16 * (i + 1)];
        let boot = e[0];
        let start_chs = (e[1], e[2], e[3]);
        let os_type = e[4];
        let start_lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        if boot != 0x00 && boot != 0x80 {
            return Err(format!("MBR PTE {i} has invalid boot flag 0x{boot:02x}"));
        }
        if os_type != 0 {
            used.push(i);
        }
        if os_type == OS_TYPE_GPT_PROTECTIVE {
            protective = true;
            if start_chs != (0x00, 0x02, 0x00) {
                return Err(format!(
                    "GPT MBR has invalid start CHS {:02x}/{:02x}/{:02x}",
                    start_chs.0, start_chs.1, start_chs.2
                ));
            }
            if start_lba != 1 {
                return Err(format!("GPT MBR has invalid start LBA {start_lba}"));
            }
        }
    }
    if protective && used != [0] {
        return Err("GPT MBR defines invalid extra partitions".into());
    }
    if used.is_empty() {
        return Err("GPT MBR has no partitions defined".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(entries: &[(usize, u8, u8, u8, u32)]) -> Vec<u8> {
        let mut s = vec![0u8; 512];
        s[510..512].copy_from_slice(&MBR_SIGNATURE);
        for &(n, boot, head, os, lba) in entries {
            let e = &mut s[PTE_START + 16 * n..PTE_START + 16 * (n + 1)];
            e[0] = boot;
            e[2] = head;
            e[4] = os;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
        }
        s
    }

    #[test]
    fn protective_mbr_rules() {
        assert!(check_partitions(&sector(&[(0, 0, 2, 0xEE, 1)])).is_ok());
        assert!(is_mbr(&sector(&[])));
        let bad = |s: &[u8], what: &str| assert!(check_partitions(s).unwrap_err().contains(what));
        bad(&sector(&[(0, 0x0A, 2, 0xEE, 1)]), "invalid boot flag");
        bad(&sector(&[]), "no partitions defined");
        bad(
            &sector(&[(0, 0, 2, 0xEE, 1), (1, 0, 2, 0xEE, 1)]),
            "invalid extra partitions",
        );
        bad(&sector(&[(0, 0, 1, 0xEE, 1)]), "invalid start CHS");
        bad(&sector(&[(0, 0, 2, 0xEE, 2)]), "invalid start LBA");
        // Other partition types may start anywhere.
        assert!(check_partitions(&sector(&[(0, 0, 1, 0x8E, 2), (1, 0, 2, 0x02, 1)])).is_ok());
    }
}
