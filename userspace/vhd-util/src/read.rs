//! `vhd-util read`: an image's structures and data, as the original prints them (a debugging
//! tool: the headers as text, bitmaps and data as raw bytes on stdout).
//!
//! Each flag prints one thing; several are done in the original's order: `-p` (the footer, the
//! header, a differencing disk's parent locators, the batmap's header), `-t SEC` (where sectors
//! are in the file), `-b BLK` (BAT entries), `-B` (the BAT as a bitmap, one bit per block, most
//! significant first), `-m BLK` (a block's sector bitmap, raw), `-i SEC` (sectors' bits), `-e SEC`
//! (runs of sectors whose bit is set, `START COUNT`), `-a` (the batmap, raw), `-j BLK` (blocks'
//! batmap bits), `-d BLK` (a block's data, raw), `-r SEC` (sectors of the disk as it reads,
//! through its parents), `-R BYTE` (bytes of the disk, likewise). `-c NUM` is how many sectors,
//! blocks or bytes (1 by default), `-x` prints numbers in hex. A range past the disk (or the BAT)
//! is refused with `ERANGE`.
//!
//! Numbers in text are decimal (`-x`: C's `%#x`, so zero is `0`); timestamps are C's `ctime`
//! format, in UTC (the original prints local time). An image that does not open gets its footer
//! and header printed as found (`NAME appears invalid; dumping headers`) before the error.

use std::io::{self, Write};
use std::path::Path;

use blktap::vhd::chain::Chain;
use blktap::vhd::footer::FOOTER_SIZE;
use blktap::vhd::header::{Locator, HEADER_SIZE, PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use blktap::vhd::image::bit;
use blktap::vhd::{checksum, uuid_string, VhdError, VhdImage, UNALLOCATED, VHD_EPOCH_OFFSET};

/// What to print.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// Print the footer, header, parent locators and batmap header.
    #[arg(short = 'p')]
    pub headers: bool,
    /// Translate sectors (from SEC) to their place in the file.
    #[arg(short = 't', value_name = "SEC")]
    pub translate: Option<u64>,
    /// Print BAT entries (from BLK).
    #[arg(short = 'b', value_name = "BLK")]
    pub bat: Option<u64>,
    /// Print the whole BAT as a bitmap (raw).
    #[arg(short = 'B')]
    pub bat_bitmap: bool,
    /// Print blocks' sector bitmaps (from BLK, raw).
    #[arg(short = 'm', value_name = "BLK")]
    pub bitmap: Option<u64>,
    /// Test sectors' bits (from SEC).
    #[arg(short = 'i', value_name = "SEC")]
    pub test_bitmap: Option<u64>,
    /// Print the runs of sectors present (from SEC).
    #[arg(short = 'e', value_name = "SEC")]
    pub extents: Option<u64>,
    /// Print the batmap (raw).
    #[arg(short = 'a')]
    pub batmap: bool,
    /// Test blocks' batmap bits (from BLK).
    #[arg(short = 'j', value_name = "BLK")]
    pub test_batmap: Option<u64>,
    /// Print blocks' data (from BLK, raw).
    #[arg(short = 'd', value_name = "BLK")]
    pub data: Option<u64>,
    /// How many sectors, blocks or bytes.
    #[arg(short = 'c', value_name = "NUM", default_value_t = 1)]
    pub count: u64,
    /// Read sectors of the disk (from SEC, raw, through its parents).
    #[arg(short = 'r', value_name = "SEC")]
    pub sectors: Option<u64>,
    /// Read bytes of the disk (from BYTE, raw, through its parents).
    #[arg(short = 'R', value_name = "BYTE")]
    pub bytes: Option<u64>,
    /// Numbers in hex.
    #[arg(short = 'x')]
    pub hex: bool,
}

/// A failure: the message and the errno.
pub type Failure = (String, i32);

fn vhd(e: VhdError) -> Failure {
    let errno = e.errno();
    (e.to_string(), errno)
}

fn out(e: io::Error) -> Failure {
    (
        format!("cannot write to stdout: {e}"),
        e.raw_os_error().unwrap_or(libc::EIO),
    )
}

/// A number as the original prints it (`%llu`, or `%#llx` with `-x`).
fn num(hex: bool, v: u64) -> String {
    if hex && v != 0 {
        format!("{v:#x}")
    } else {
        v.to_string()
    }
}

/// A VHD timestamp as C's `ctime` prints it (without its newline), in UTC.
pub fn time_string(ts: u32) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = VHD_EPOCH_OFFSET + u64::from(ts);
    let (days, secs) = (t / 86400, t % 86400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{} {} {day:2} {:02}:{:02}:{:02} {year}",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// A cookie (or creator) as C prints it: the bytes up to the first NUL.
fn c_text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The stored checksum at `at` and the one computed with that field zeroed.
fn checksums(b: &[u8], at: usize) -> (u32, u32) {
    let mut copy = b.to_vec();
    copy[at..at + 4].fill(0);
    (be32(b, at), checksum(&copy))
}

fn checksum_line(stored: u32, computed: u32) -> String {
    let verdict = if stored == computed { "Good!" } else { "Bad!" };
    format!("Checksum            : 0x{stored:x}|0x{computed:x} ({verdict})")
}

fn uuid_at(b: &[u8], at: usize) -> String {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[at..at + 16]);
    uuid_string(&u)
}

/// The footer summary of the 512 bytes `b`.
fn print_footer(w: &mut impl Write, b: &[u8; FOOTER_SIZE], hex: bool) -> io::Result<()> {
    let n = |v| num(hex, v);
    writeln!(w, "VHD Footer Summary:\n-------------------")?;
    writeln!(w, "Cookie              : {}", c_text(&b[..8]))?;
    let features = be32(b, 8);
    writeln!(
        w,
        "Features            : ({features:#010x}) {}{}",
        if features & 1 != 0 { "<TEMP>" } else { "" },
        if features & 2 != 0 { "<RESV>" } else { "" }
    )?;
    let version = be32(b, 12);
    writeln!(
        w,
        "File format version : Major: {}, Minor: {}",
        version >> 16,
        version & 0xffff
    )?;
    writeln!(w, "Data offset         : {}", n(be64(b, 16)))?;
    writeln!(w, "Timestamp           : {}", time_string(be32(b, 24)))?;
    writeln!(w, "Creator Application : '{}'", c_text(&b[28..32]))?;
    let creator = be32(b, 32);
    writeln!(
        w,
        "Creator version     : Major: {}, Minor: {}",
        creator >> 16,
        creator & 0xffff
    )?;
    let os = match &b[36..40] {
        b"Wi2k" => "Windows",
        b"Mac " => "Macintosh",
        _ => "Unknown!",
    };
    writeln!(w, "Creator OS          : {os}")?;
    let (orig, cur) = (be64(b, 40), be64(b, 48));
    writeln!(
        w,
        "Original disk size  : {} MB ({} Bytes)",
        n(orig >> 20),
        n(orig)
    )?;
    writeln!(
        w,
        "Current disk size   : {} MB ({} Bytes)",
        n(cur >> 20),
        n(cur)
    )?;
    let (c, h, s) = (
        u64::from(u16::from_be_bytes([b[56], b[57]])),
        u64::from(b[58]),
        u64::from(b[59]),
    );
    writeln!(
        w,
        "Geometry            : Cyl: {}, Hds: {}, Sctrs: {}",
        n(c),
        n(h),
        n(s)
    )?;
    writeln!(
        w,
        "                    : = {} MB ({} Bytes)",
        n((c * h * s) >> 11),
        n((c * h * s) << 9)
    )?;
    let kind = match be32(b, 60) {
        0 => "None",
        2 => "Fixed hard disk",
        3 => "Dynamic hard disk",
        4 => "Differencing hard disk",
        1 | 5 | 6 => "Reserved (deprecated)",
        _ => "Unknown type!",
    };
    writeln!(w, "Disk type           : {kind}")?;
    let (stored, computed) = checksums(b, 64);
    writeln!(w, "{}", checksum_line(stored, computed))?;
    writeln!(w, "UUID                : {}", uuid_at(b, 68))?;
    let saved = if b[84] == 0 { "No" } else { "Yes" };
    writeln!(w, "Saved state         : {saved}")?;
    writeln!(w, "Hidden              : {}", b[85])?;
    writeln!(w)
}

/// The header summary of the 1024 bytes `b`.
fn print_header(w: &mut impl Write, b: &[u8; HEADER_SIZE], hex: bool) -> io::Result<()> {
    let n = |v| num(hex, v);
    writeln!(w, "VHD Header Summary:\n-------------------")?;
    writeln!(w, "Cookie              : {}", c_text(&b[..8]))?;
    writeln!(w, "Data offset (unusd) : {}", n(be64(b, 8)))?;
    writeln!(w, "Table offset        : {}", n(be64(b, 16)))?;
    writeln!(w, "Header version      : {:#010x}", be32(b, 24))?;
    writeln!(w, "Max BAT size        : {}", n(u64::from(be32(b, 28))))?;
    let bs = u64::from(be32(b, 32));
    writeln!(w, "Block size          : {} ({} MB)", n(bs), n(bs >> 20))?;
    let units: Vec<u16> = b[64..576]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let name = String::from_utf16(&units).unwrap_or_else(|_| "failed to read name".into());
    writeln!(w, "Parent name         : {name}")?;
    writeln!(w, "Parent UUID         : {}", uuid_at(b, 40))?;
    writeln!(w, "Parent timestamp    : {}", time_string(be32(b, 56)))?;
    let (stored, computed) = checksums(b, 36);
    writeln!(w, "{}", checksum_line(stored, computed))?;
    writeln!(w)
}

fn code_name(code: u32) -> &'static str {
    match code {
        0 => "PLAT_CODE_NONE",
        0x5769_3272 => "PLAT_CODE_WI2R",
        0x5769_326B => "PLAT_CODE_WI2K",
        PLAT_W2RU => "PLAT_CODE_W2RU",
        PLAT_W2KU => "PLAT_CODE_W2KU",
        0x4D61_6320 => "PLAT_CODE_MAC",
        PLAT_MACX => "PLAT_CODE_MACX",
        _ => "UNKOWN",
    }
}

fn print_locators(w: &mut impl Write, image: &VhdImage, hex: bool) -> io::Result<()> {
    let n = |v| num(hex, v);
    writeln!(w, "VHD Parent Locators:\n--------------------")?;
    let locators: Vec<Locator> = image.header().map_or(Vec::new(), |h| h.locators.to_vec());
    for (i, l) in locators.iter().enumerate().filter(|(_, l)| l.code != 0) {
        writeln!(w, "locator:            : {i}")?;
        writeln!(w, "       code         : {}", code_name(l.code))?;
        writeln!(w, "       data_space   : {}", n(u64::from(l.data_space)))?;
        writeln!(w, "       data_length  : {}", n(u64::from(l.data_len)))?;
        writeln!(w, "       data_offset  : {}", n(l.data_offset))?;
        match image.locator_data(l).and_then(|d| l.decode(&d)) {
            Some(name) => writeln!(w, "       decoded name : {name}")?,
            None => writeln!(w, "failed to read parent name")?,
        }
        writeln!(w)?;
    }
    Ok(())
}

/// The end of the BAT's sectors, where a batmap's header is.
fn bat_end(image: &VhdImage) -> u64 {
    image.header().map_or(0, |h| {
        h.table_offset + (u64::from(h.max_table_entries) * 4).next_multiple_of(512)
    })
}

fn print_batmap_header(w: &mut impl Write, image: &VhdImage, hex: bool) -> io::Result<()> {
    let n = |v| num(hex, v);
    let mut hb = [0u8; 512];
    if image.read_file(bat_end(image), &mut hb).is_err() {
        return writeln!(w, "failed to get batmap header");
    }
    let (offset, secs) = (be64(&hb, 8), be32(&hb, 16));
    writeln!(w, "VHD Batmap Summary:\n-------------------")?;
    writeln!(w, "Batmap offset       : {}", n(offset))?;
    writeln!(w, "Batmap size (secs)  : {}", n(u64::from(secs)))?;
    writeln!(w, "Batmap version      : {:#010x}", be32(&hb, 20))?;
    let mut map = vec![0u8; image.batmap().map_or(0, |b| b.bytes) as usize];
    if map.is_empty() || image.read_file(offset, &mut map).is_err() {
        writeln!(
            w,
            "Checksum            : 0x{:x}|unreadable (Bad!)",
            be32(&hb, 24)
        )?;
    } else {
        let computed = blktap::vhd::batmap_checksum(&map, be32(&hb, 20));
        writeln!(w, "{}", checksum_line(be32(&hb, 24), computed))?;
    }
    writeln!(w)
}

fn print_headers(w: &mut impl Write, image: &VhdImage, hex: bool) -> Result<(), Failure> {
    let mut fb = [0u8; FOOTER_SIZE];
    image
        .read_file(image.physical_size() - FOOTER_SIZE as u64, &mut fb)
        .map_err(vhd)?;
    print_footer(w, &fb, hex).map_err(out)?;
    if image.header().is_some() {
        let mut hb = [0u8; HEADER_SIZE];
        image
            .read_file(image.footer().data_offset, &mut hb)
            .map_err(vhd)?;
        print_header(w, &hb, hex).map_err(out)?;
        if image.has_parent() {
            print_locators(w, image, hex).map_err(out)?;
        }
        if image.batmap().is_some() {
            print_batmap_header(w, image, hex).map_err(out)?;
        }
    }
    Ok(())
}

/// Prints the footer and header of a file that does not open as a VHD, as far as they can be
/// read: the trailing footer (or the copy at offset 0 if only it has the cookie) and the header
/// at its data offset.
fn dump_headers(w: &mut impl Write, name: &Path, hex: bool) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let Ok(file) = std::fs::File::open(name) else {
        return Ok(());
    };
    let len = file.metadata().map_or(0, |m| m.len());
    if len < FOOTER_SIZE as u64 {
        return Ok(());
    }
    // Only writes fail this: a file that cannot be read (a directory) gets no dump.
    let mut fb = [0u8; FOOTER_SIZE];
    if file
        .read_exact_at(&mut fb, len - FOOTER_SIZE as u64)
        .is_err()
    {
        return Ok(());
    }
    writeln!(w, "\n{} appears invalid; dumping headers\n", name.display())?;
    let mut copy = [0u8; FOOTER_SIZE];
    if &fb[..8] != b"conectix"
        && file.read_exact_at(&mut copy, 0).is_ok()
        && &copy[..8] == b"conectix"
    {
        fb = copy;
    }
    print_footer(w, &fb, hex)?;
    let at = be64(&fb, 16);
    let mut hb = [0u8; HEADER_SIZE];
    if at.checked_add(HEADER_SIZE as u64).is_some_and(|e| e <= len)
        && file.read_exact_at(&mut hb, at).is_ok()
    {
        print_header(w, &hb, hex)?;
    }
    Ok(())
}

fn past_end(what: &str, first: u64, count: u64, limit: u64, hex: bool) -> Result<(), Failure> {
    match first.checked_add(count) {
        Some(end) if end <= limit => Ok(()),
        _ => Err((
            format!(
                "{what} {} past the end ({} {what}s)",
                num(hex, first.saturating_add(count)),
                num(hex, limit)
            ),
            libc::ERANGE,
        )),
    }
}

/// Refuses a fixed disk for a flag about blocks.
fn need_bat(image: &VhdImage, flag: &str) -> Result<(), Failure> {
    if image.header().is_none() {
        return Err((
            format!(
                "{}: is a fixed disk: it has no BAT (read {flag})",
                image.path().display()
            ),
            libc::EINVAL,
        ));
    }
    Ok(())
}

/// The blocks `[first, first + count)`, checked against the BAT.
fn blocks(
    image: &VhdImage,
    flag: &str,
    first: u64,
    count: u64,
    hex: bool,
) -> Result<std::ops::Range<u32>, Failure> {
    need_bat(image, flag)?;
    let n = image.bat().len() as u64;
    past_end("block", first, count, n, hex)?;
    // CAST: below the BAT's length, a `u32`.
    Ok(first as u32..(first + count) as u32)
}

/// The sectors `[first, first + count)`, checked against the disk.
fn sectors(image: &VhdImage, first: u64, count: u64, hex: bool) -> Result<(), Failure> {
    past_end("sector", first, count, image.size() / 512, hex)
}

/// Calls `each(sector, block, sector in block, bit)` for the sectors from `first`.
fn for_bits(
    image: &mut VhdImage,
    first: u64,
    count: u64,
    mut each: impl FnMut(u64, u64, u64, bool) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let spb = image.block_size() / 512;
    for cur in first..first + count {
        let (block, sec) = (cur / spb, cur % spb);
        // CAST: `cur` is inside the disk, whose blocks are counted in `u32`.
        let set = image.bat()[block as usize] != UNALLOCATED
            && bit(image.bitmap(block as u32).map_err(vhd)?, sec);
        each(cur, block, sec, set)?;
    }
    Ok(())
}

/// Reads `count` bytes of the disk at byte `first` through its chain, onto `w`.
fn read_disk(w: &mut impl Write, name: &Path, first: u64, count: u64) -> Result<(), Failure> {
    const CHUNK: u64 = 2 << 20;
    let mut chain = Chain::open(name, false).map_err(vhd)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let (mut pos, end) = (first, first + count);
    while pos < end {
        let start = pos / 512 * 512;
        let stop = end.min(start + CHUNK).next_multiple_of(512);
        let part = &mut buf[..(stop - start) as usize];
        chain.read(start, part).map_err(vhd)?;
        let skip = (pos - start) as usize;
        let take = (end.min(stop) - pos) as usize;
        w.write_all(&part[skip..skip + take]).map_err(out)?;
        pos += take as u64;
    }
    Ok(())
}

/// Prints what `o` asks of the image at `name`.
pub fn run(name: &Path, o: &Options) -> Result<(), Failure> {
    let stdout = io::stdout();
    let mut w = io::BufWriter::new(stdout.lock());
    let result = print(&mut w, name, o);
    let flushed = w.flush().map_err(out);
    result.and(flushed)
}

fn print(w: &mut impl Write, name: &Path, o: &Options) -> Result<(), Failure> {
    let (hex, count) = (o.hex, o.count);
    let n = |v| num(hex, v);
    let mut image = match VhdImage::open(name, false) {
        Ok(image) => image,
        Err(e) => {
            dump_headers(w, name, hex).map_err(out)?;
            return Err(vhd(e));
        }
    };
    if o.headers {
        print_headers(w, &image, hex)?;
    }
    if let Some(first) = o.translate {
        need_bat(&image, "-t")?;
        sectors(&image, first, count, hex)?;
        let spb = image.block_size() / 512;
        let bm = image.header().map_or(0, |h| h.bitmap_bytes());
        for cur in first..first + count {
            let (block, sec) = (cur / spb, cur % spb);
            let entry = image.bat()[block as usize];
            let at = if entry == UNALLOCATED {
                "not allocated".to_string()
            } else {
                n(u64::from(entry) * 512 + bm + sec * 512)
            };
            writeln!(
                w,
                "logical sector {}: block number: {}, sector offset: {}, file offset: {at}",
                n(cur),
                n(block),
                n(sec)
            )
            .map_err(out)?;
        }
    }
    if let Some(first) = o.bat {
        for block in blocks(&image, "-b", first, count, hex)? {
            let entry = image.bat()[block as usize];
            let at = if entry == UNALLOCATED {
                "not allocated".to_string()
            } else {
                n(u64::from(entry) * 512)
            };
            writeln!(w, "block: {}: offset: {at}", n(u64::from(block))).map_err(out)?;
        }
    }
    if o.bat_bitmap {
        need_bat(&image, "-B")?;
        let mut map = vec![0u8; image.bat().len().div_ceil(8)];
        for (i, _) in image
            .bat()
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != UNALLOCATED)
        {
            map[i / 8] |= 0x80 >> (i % 8);
        }
        w.write_all(&map).map_err(out)?;
    }
    if let Some(first) = o.bitmap {
        for block in blocks(&image, "-m", first, count, hex)? {
            if image.bat()[block as usize] == UNALLOCATED {
                writeln!(w, "block {} not allocated", n(u64::from(block))).map_err(out)?;
            } else {
                let bitmap = image.bitmap(block).map_err(vhd)?;
                w.write_all(bitmap).map_err(out)?;
            }
        }
    }
    if let Some(first) = o.test_bitmap {
        need_bat(&image, "-i")?;
        sectors(&image, first, count, hex)?;
        for_bits(&mut image, first, count, |_, block, sec, set| {
            writeln!(w, "block {}: sec: {}: {}", n(block), n(sec), u8::from(set)).map_err(out)
        })?;
    }
    if let Some(first) = o.extents {
        need_bat(&image, "-e")?;
        sectors(&image, first, count, hex)?;
        let mut run: Option<(u64, u64)> = None;
        for_bits(&mut image, first, count, |cur, _, _, set| {
            match (&mut run, set) {
                (Some((_, len)), true) => *len += 1,
                (None, true) => run = Some((cur, 1)),
                (Some((start, len)), false) => {
                    writeln!(w, "{} {}", n(*start), n(*len)).map_err(out)?;
                    run = None;
                }
                (None, false) => {}
            }
            Ok(())
        })?;
        if let Some((start, len)) = run {
            writeln!(w, "{} {}", n(start), n(len)).map_err(out)?;
        }
    }
    if o.batmap {
        need_bat(&image, "-a")?;
        let Some(b) = image.batmap().filter(|b| b.bytes > 0) else {
            return Err(no_batmap(&image));
        };
        let mut map = vec![0u8; b.bytes as usize];
        image.read_file(b.offset, &mut map).map_err(vhd)?;
        w.write_all(&map).map_err(out)?;
    }
    if let Some(first) = o.test_batmap {
        let range = blocks(&image, "-j", first, count, hex)?;
        let Some(b) = image.batmap().filter(|b| b.bytes > 0) else {
            return Err(no_batmap(&image));
        };
        let mut map = vec![0u8; b.bytes as usize];
        image.read_file(b.offset, &mut map).map_err(vhd)?;
        for block in range {
            let set = bit(&map, u64::from(block));
            writeln!(
                w,
                "batmap for block {}: {}",
                n(u64::from(block)),
                u8::from(set)
            )
            .map_err(out)?;
        }
    }
    if let Some(first) = o.data {
        let bm = image.header().map_or(0, |h| h.bitmap_bytes());
        let mut buf = vec![0u8; image.block_size() as usize];
        for block in blocks(&image, "-d", first, count, hex)? {
            let entry = image.bat()[block as usize];
            if entry == UNALLOCATED {
                writeln!(w, "block {} not allocated", n(u64::from(block))).map_err(out)?;
            } else {
                image
                    .read_file(u64::from(entry) * 512 + bm, &mut buf)
                    .map_err(vhd)?;
                w.write_all(&buf).map_err(out)?;
            }
        }
    }
    if let Some(first) = o.sectors {
        sectors(&image, first, count, hex)?;
        read_disk(w, name, first * 512, count * 512)?;
    }
    if let Some(first) = o.bytes {
        past_end("byte", first, count, image.size(), hex)?;
        read_disk(w, name, first, count)?;
    }
    Ok(())
}

fn no_batmap(image: &VhdImage) -> Failure {
    (
        format!("{}: has no batmap", image.path().display()),
        libc::EINVAL,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_ctime_in_utc() {
        // Expected values from Python's datetime(2000, 1, 1) + timedelta(seconds=...).
        for (ts, text) in [
            (0, "Sat Jan  1 00:00:00 2000"),
            (59 * 86400, "Tue Feb 29 00:00:00 2000"),
            (60 * 86400, "Wed Mar  1 00:00:00 2000"),
            (366 * 86400 - 1, "Sun Dec 31 23:59:59 2000"),
            (849_839_726, "Sun Dec  6 02:35:26 2026"),
            (u32::MAX, "Tue Feb  7 06:28:15 2136"),
        ] {
            assert_eq!(time_string(ts), text, "{ts}");
        }
    }

    #[test]
    fn numbers_print_as_c_does() {
        assert_eq!(num(false, 0), "0");
        assert_eq!(num(true, 0), "0");
        assert_eq!(num(true, 255), "0xff");
        assert_eq!(num(false, u64::MAX), "18446744073709551615");
    }
}
