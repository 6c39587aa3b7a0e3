using System.Buffers;
using System.Buffers.Binary;
using System.IO.Hashing;
using Microsoft.Win32.SafeHandles;
using NbdServer.Common.Posix;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Storage;

/// <summary>
/// One region on local disk (layout: <see cref="RegionLayout"/>). All IO methods are synchronous and
/// meant for the dedicated IO threads; the scheduler guarantees that overlapping jobs never run at
/// the same time, that a flush runs alone (a barrier), and that a repair commit (staged or in
/// place) runs after every earlier job on its extent and before every later one, beside jobs on
/// other extents.
/// </summary>
/// <remarks>
/// Durability rules, in the order they happen:
/// <list type="number">
/// <item>Before the first write to a clean extent reaches the file, the extent's dirty bit is made
/// durable (record write + fdatasync of region.meta, batched across concurrent writers). Otherwise
/// a crash could leave new data on disk under a "clean, flush N" record that matches the other
/// replicas, and reconciliation would never notice the replicas differ.</item>
/// <item>Data then context are written with pwrite; a crash between them is caught by the hash.</item>
/// <item>Flush fdatasyncs every dirty extent file, then writes (generation, flush number, clean)
/// records and fdatasyncs region.meta. A failed fdatasync leaves the extent dirty and
/// <em>poisoned</em>: Linux drops the failed pages, so a later fsync could succeed without the data;
/// every later flush fails until live repair replaces the extent with a staged whole copy. The
/// extent's record is also marked <em>uncertain</em> (best effort: region.meta may be failing too),
/// so a restart, which forgets the poisoning, still reports it.</item>
/// <item>A repair commit makes the new contents durable before its record: a staged commit
/// fdatasyncs the staging file, renames it over the extent and fsyncs the directory; an in-place
/// commit (the changed blocks came as ordinary writes, which made the extent dirty by rule 1)
/// fdatasyncs the extent file. A crash before the record leaves the old, dirty or older record,
/// which the engine sees as still needing repair.</item>
/// <item>An extent is <em>uncertain</em> (<see cref="ExtentMeta.Uncertain"/>) when it is poisoned or
/// was dirty when the region was opened in a boot of the machine other than the one it was last
/// opened in (or that boot is not recorded): a power loss or kernel crash may have dropped writes
/// the downstairs acknowledged, which a process restart in the same boot does not. Open records the
/// uncertain marks, and only then the current boot id, so a crash between the two is re-judged the
/// same way. The mark lasts until a flush stamps the extent (its blocks are then durable and, by
/// the engine flushing them, current) or a commit replaces it.</item>
/// </list>
/// </remarks>
internal sealed class Region : IDisposable
{
    private readonly string _dir;
    private readonly SafeFileHandle _meta;
    private readonly FileStream? _lock;
    private readonly Extent[] _extents;
    private readonly object _dirtyLock = new(); // Monitor: writers wait for the running dirty-marking commit
    private readonly Lock _recordLock = new();
    private DirtyBatch? _collecting;
    private bool _commitRunning;
    private ulong _stateSeq;
    private int _stateSlot;
    private ulong _bootSeq;
    private int _bootSlot;
    private ulong _highestFlushRecorded;

    private Region(string dir, Guid uuid, RegionGeometry geometry, bool preallocated, bool readOnly, SafeFileHandle meta, FileStream? lockFile, Extent[] extents, ulong stateSeq, int stateSlot, ulong highestGeneration)
    {
        _dir = dir;
        Uuid = uuid;
        Geometry = geometry;
        Preallocated = preallocated;
        ReadOnly = readOnly;
        _meta = meta;
        _lock = lockFile;
        _extents = extents;
        _stateSeq = stateSeq;
        _stateSlot = stateSlot;
        HighestGeneration = highestGeneration;
        foreach (Extent e in extents)
        {
            _highestFlushRecorded = Math.Max(_highestFlushRecorded, e.Flush);
        }
    }

    public Guid Uuid { get; }

    public RegionGeometry Geometry { get; }

    public bool Preallocated { get; }

    public bool ReadOnly { get; }

    public string Directory => _dir;

    /// <summary>The highest upstairs generation ever accepted (durable: the fence survives restarts).</summary>
    public ulong HighestGeneration { get; private set; }

    /// <summary>Keep extents written since the last flush marked dirty across a flush (see <see cref="Flush"/>).</summary>
    public bool StickyDirty { get; set; }

    /// <summary>How this open compared the machine's boot with the one the region was last opened in.</summary>
    public BootAtOpen BootAtOpen { get; private init; }

    /// <summary>Extents uncertain when the region was opened: recorded so earlier, or dirty and judged so now.</summary>
    public int UncertainAtOpen { get; private init; }

    public ExtentMeta GetExtentMeta(int extent)
    {
        Extent e = _extents[extent];
        lock (_recordLock)
        {
            return new ExtentMeta(e.Generation, e.Flush, e.Dirty, e.Uncertain || e.Poisoned);
        }
    }

    public ExtentMeta[] GetAllExtentMeta()
    {
        var all = new ExtentMeta[_extents.Length];
        for (int i = 0; i < all.Length; i++)
        {
            all[i] = GetExtentMeta(i);
        }
        return all;
    }

    public bool IsPoisoned(int extent) => _extents[extent].Poisoned;

    /// <summary>
    /// The highest flush number any extent has recorded since the region was opened (any generation):
    /// the base from which a flush or repair commit may step (DownstairsOptions.MaxFlushStep).
    /// </summary>
    public ulong HighestFlushRecorded
    {
        get
        {
            lock (_recordLock)
            {
                return _highestFlushRecorded;
            }
        }
    }

    /// <summary>The highest flush number recorded on any extent stamped with <paramref name="generation"/> (0 if none).</summary>
    public ulong HighestFlushNumber(ulong generation)
    {
        ulong highest = 0;
        lock (_recordLock)
        {
            foreach (Extent e in _extents)
            {
                if (e.Generation == generation && e.Flush > highest)
                {
                    highest = e.Flush;
                }
            }
        }
        return highest;
    }

    // ---------------------------------------------------------------- create / open

    /// <param name="progress">Called with (extents done, extent count) after each extent file: a
    /// preallocated multi-TiB region takes minutes (fallocate + fsync per file).</param>
    /// <param name="bootId">Where the current boot id comes from (default <see cref="BootId.Current"/>; tests pass their own).</param>
    public static Region Create(string dir, long sizeBytes, int blockSize, int? extentBlocks, bool preallocate, Action<int, int>? progress = null, Func<Guid?>? bootId = null)
    {
        if (blockSize is not (512 or 4096))
        {
            throw new ArgumentException($"--block-size must be 512 or 4096, not {blockSize}");
        }
        if (sizeBytes <= 0 || sizeBytes % blockSize != 0)
        {
            throw new ArgumentException($"--size {sizeBytes} is not a positive multiple of the block size {blockSize}");
        }
        long blocks = sizeBytes / blockSize;
        int perExtent = extentBlocks ?? (int)Math.Min(DefaultExtentBytes / blockSize, blocks);
        if (perExtent <= 0 || perExtent > RegionLayout.MaxExtentBlocks)
        {
            throw new ArgumentException($"--extent-size must be 1 to {RegionLayout.MaxExtentBlocks} blocks, not {perExtent}");
        }
        if (blocks % perExtent != 0)
        {
            throw new ArgumentException($"--size {sizeBytes} is not a whole number of extents ({perExtent} blocks × {blockSize} bytes = {(long)perExtent * blockSize} bytes each)");
        }
        if (blocks / perExtent > RegionLayout.MaxExtentCount)
        {
            throw new ArgumentException($"{blocks / perExtent} extents is more than the limit of {RegionLayout.MaxExtentCount}; use a larger --extent-size");
        }
        var geometry = new RegionGeometry(blockSize, perExtent, (int)(blocks / perExtent));
        string metaPath = RegionLayout.MetaPath(dir);
        if (File.Exists(metaPath))
        {
            throw new IOException($"{metaPath}: a region already exists here; refusing to overwrite it");
        }
        string extentDir = Path.Combine(dir, RegionLayout.ExtentDirName);
        System.IO.Directory.CreateDirectory(extentDir);
        for (int i = 0; i < geometry.ExtentCount; i++)
        {
            string path = RegionLayout.ExtentPath(dir, i);
            using SafeFileHandle h = File.OpenHandle(path, FileMode.Create, FileAccess.ReadWrite);
            if (preallocate)
            {
                PosixFile.Allocate(h, 0, geometry.ExtentFileBytes, path);
            }
            else
            {
                RandomAccess.SetLength(h, geometry.ExtentFileBytes);
            }
            PosixFile.FlushToDisk(h, dataOnly: false, path);
            progress?.Invoke(i + 1, geometry.ExtentCount);
        }
        PosixDirectory.FlushToDisk(extentDir);

        // region.meta appears last, by rename: a half-created region has no metadata and cannot be opened.
        Guid uuid = Guid.NewGuid();
        string tmp = metaPath + ".tmp";
        using (SafeFileHandle h = File.OpenHandle(tmp, FileMode.Create, FileAccess.ReadWrite))
        {
            byte[] header = RegionLayout.BuildHeader(uuid, geometry, preallocate);
            RandomAccess.Write(h, header, 0);
            byte[] records = new byte[RegionLayout.MetaFileBytes(geometry.ExtentCount) - RegionLayout.HeaderSize];
            for (int i = 0; i < geometry.ExtentCount; i++)
            {
                RegionLayout.WriteRecord(records.AsSpan(i * RegionLayout.RecordsPerExtent * RegionLayout.RecordSlotSize, RegionLayout.RecordSlotSize), 1, 0, 0, false);
            }
            RandomAccess.Write(h, records, RegionLayout.HeaderSize);
            PosixFile.FlushToDisk(h, dataOnly: false, tmp);
        }
        File.Move(tmp, metaPath);
        File.WriteAllBytes(Path.Combine(dir, RegionLayout.LockFileName), []);
        PosixDirectory.FlushToDisk(dir);
        return Open(dir, bootId: bootId);
    }

    /// <summary>Default extent: 32 MiB of blocks (fsync granularity vs. file count; 8 GiB = 256 files).</summary>
    public const long DefaultExtentBytes = 32L << 20;

    /// <summary>
    /// Opens a region. Everything is validated read-only first; only a region that passed is locked,
    /// has its stale repair staging files removed and its uncertain extents and boot id recorded, so
    /// a damaged region is left exactly as found. Read-only, the uncertain marks are judged the same
    /// way but only in memory.
    /// </summary>
    /// <param name="bootId">Where the current boot id comes from (default <see cref="BootId.Current"/>; tests pass their own).</param>
    public static Region Open(string dir, bool readOnly = false, Func<Guid?>? bootId = null)
    {
        string metaPath = RegionLayout.MetaPath(dir);
        if (!File.Exists(metaPath))
        {
            throw new RegionDamagedException(metaPath, System.IO.Directory.Exists(dir) ? "missing: this directory holds no region (create one with `nbd-downstairs create`)" : "missing: no such directory");
        }
        byte[] header = new byte[RegionLayout.HeaderSize];
        RegionGeometry geometry;
        Guid uuid;
        bool preallocated;
        byte[] records;
        using (SafeFileHandle h = File.OpenHandle(metaPath, FileMode.Open, FileAccess.Read))
        {
            long length = RandomAccess.GetLength(h);
            if (length < RegionLayout.HeaderSize)
            {
                throw new RegionDamagedException(metaPath, $"truncated: {length} bytes, shorter than the {RegionLayout.HeaderSize}-byte header");
            }
            ReadExactly(h, header, 0, metaPath);
            (uuid, geometry, preallocated) = ParseHeader(header, metaPath);
            long expected = RegionLayout.MetaFileBytes(geometry.ExtentCount);
            if (length != expected)
            {
                throw new RegionDamagedException(metaPath, $"{length} bytes, expected {expected} for {geometry.ExtentCount} extents ({(length < expected ? "truncated" : "trailing garbage")})");
            }
            records = new byte[expected - RegionLayout.HeaderSize];
            ReadExactly(h, records, RegionLayout.HeaderSize, metaPath);
        }
        var extents = new Extent[geometry.ExtentCount];
        ulong highest = 0;
        for (int i = 0; i < extents.Length; i++)
        {
            var e = new Extent(i, RegionLayout.ExtentPath(dir, i));
            int best = -1;
            for (int s = 0; s < RegionLayout.RecordsPerExtent; s++)
            {
                var rec = RegionLayout.ReadRecord(records.AsSpan((i * RegionLayout.RecordsPerExtent * RegionLayout.RecordSlotSize) + (s * RegionLayout.RecordSlotSize), RegionLayout.RecordSlotSize));
                if (rec is { } r && (best < 0 || r.Seq > e.Seq))
                {
                    best = s;
                    (e.Seq, e.Generation, e.Flush, e.Dirty, e.Uncertain) = r;
                }
            }
            if (best < 0)
            {
                throw new RegionDamagedException(metaPath, $"extent {i} has no valid metadata record (both slots fail their checksum)");
            }
            e.Slot = best;
            highest = Math.Max(highest, e.Generation);
            extents[i] = e;
            FileInfo info = new(e.Path);
            if (!info.Exists)
            {
                throw new RegionDamagedException(e.Path, "missing extent file");
            }
            if (info.Length != geometry.ExtentFileBytes)
            {
                throw new RegionDamagedException(e.Path, $"{info.Length} bytes, expected {geometry.ExtentFileBytes} ({(info.Length < geometry.ExtentFileBytes ? "truncated" : "too long")})");
            }
        }
        ulong stateSeq = 0;
        int stateSlot = 0;
        foreach ((int slot, int offset) in new[] { (0, RegionLayout.StateSlotOffsetA), (1, RegionLayout.StateSlotOffsetB) })
        {
            if (RegionLayout.ReadStateSlot(header.AsSpan(offset, RegionLayout.StateSlotSize)) is { } st && st.Seq > stateSeq)
            {
                (stateSeq, stateSlot) = (st.Seq, slot);
                highest = Math.Max(highest, st.HighestGeneration);
            }
        }
        if (stateSeq == 0)
        {
            throw new RegionDamagedException(metaPath, "no valid generation record (both slots fail their checksum)");
        }
        // No valid boot slot is not damage: a region from before boot ids were recorded has none.
        ulong bootSeq = 0;
        int bootSlot = 1; // the first recording then goes to slot A
        Guid? recordedBoot = null;
        foreach ((int slot, int offset) in new[] { (0, RegionLayout.BootSlotOffsetA), (1, RegionLayout.BootSlotOffsetB) })
        {
            if (RegionLayout.ReadBootSlot(header.AsSpan(offset, RegionLayout.BootSlotSize)) is { } b && b.Seq > bootSeq)
            {
                (bootSeq, bootSlot, recordedBoot) = (b.Seq, slot, b.BootId);
            }
        }
        Guid? currentBoot = (bootId ?? BootId.Current)();
        BootAtOpen boot = currentBoot is null ? BootAtOpen.Unreadable
            : recordedBoot is null ? BootAtOpen.NotRecorded
            : recordedBoot == currentBoot ? BootAtOpen.Same
            : BootAtOpen.Rebooted;
        List<Extent> newlyUncertain = boot == BootAtOpen.Same ? [] : [.. extents.Where(e => e.Dirty && !e.Uncertain)];
        int uncertain = extents.Count(e => e.Uncertain) + newlyUncertain.Count;

        // Validation passed: from here on we may touch the disk.
        FileStream? lockFile = null;
        SafeFileHandle? meta = null;
        try
        {
            if (!readOnly)
            {
                string lockPath = Path.Combine(dir, RegionLayout.LockFileName);
                try
                {
                    lockFile = new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
                }
                catch (IOException e) when (File.Exists(lockPath))
                {
                    throw new IOException($"{lockPath}: region is in use by another nbd-downstairs ({e.Message})", e);
                }
                foreach (string stale in System.IO.Directory.EnumerateFiles(Path.Combine(dir, RegionLayout.ExtentDirName), "*" + RegionLayout.StagingSuffix))
                {
                    File.Delete(stale);
                }
            }
            FileAccess access = readOnly ? FileAccess.Read : FileAccess.ReadWrite;
            meta = File.OpenHandle(metaPath, FileMode.Open, access);
            foreach (Extent e in extents)
            {
                e.Handle = File.OpenHandle(e.Path, FileMode.Open, access);
            }
            if (readOnly)
            {
                foreach (Extent e in newlyUncertain)
                {
                    e.Uncertain = true;
                }
            }
            var region = new Region(dir, uuid, geometry, preallocated, readOnly, meta, lockFile, extents, stateSeq, stateSlot, highest)
            {
                BootAtOpen = boot,
                UncertainAtOpen = uncertain,
                _bootSeq = bootSeq,
                _bootSlot = bootSlot,
            };
            if (!readOnly)
            {
                try
                {
                    region.RecordBoot(newlyUncertain, boot == BootAtOpen.Same ? null : currentBoot);
                }
                catch
                {
                    region.Dispose();
                    throw;
                }
            }
            return region;
        }
        catch
        {
            foreach (Extent e in extents)
            {
                e.Handle?.Dispose();
            }
            meta?.Dispose();
            lockFile?.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Makes this open's judgement durable: first the uncertain marks, then the boot id. In that
    /// order, a crash in between leaves the old boot id, and the next open in this boot judges the
    /// same extents uncertain again; the other order could forget them.
    /// </summary>
    private void RecordBoot(List<Extent> newlyUncertain, Guid? currentBoot)
    {
        if (newlyUncertain.Count > 0)
        {
            WriteRecordsAndSync(newlyUncertain, e => (e.Generation, e.Flush, e.Dirty, true));
        }
        if (currentBoot is { } id)
        {
            Span<byte> slot = stackalloc byte[RegionLayout.BootSlotSize];
            int next = 1 - _bootSlot;
            RegionLayout.WriteBootSlot(slot, _bootSeq + 1, id);
            RandomAccess.Write(_meta, slot, next == 0 ? RegionLayout.BootSlotOffsetA : RegionLayout.BootSlotOffsetB);
            PosixFile.FlushToDisk(_meta, dataOnly: true, RegionLayout.MetaPath(_dir));
            (_bootSeq, _bootSlot) = (_bootSeq + 1, next);
        }
    }

    private static (Guid, RegionGeometry, bool) ParseHeader(byte[] h, string path)
    {
        ulong magic = BinaryPrimitives.ReadUInt64LittleEndian(h);
        if (magic != RegionLayout.Magic)
        {
            throw new RegionDamagedException(path, "bad magic: not an nbd-downstairs region metadata file");
        }
        uint version = BinaryPrimitives.ReadUInt32LittleEndian(h.AsSpan(8));
        if (version != RegionLayout.FormatVersion)
        {
            throw new RegionDamagedException(path, $"format version {version}; this nbd-downstairs reads version {RegionLayout.FormatVersion} only");
        }
        if (BinaryPrimitives.ReadUInt64LittleEndian(h.AsSpan(56)) != XxHash64.HashToUInt64(h.AsSpan(0, RegionLayout.HeaderChecksummedBytes)))
        {
            throw new RegionDamagedException(path, "header checksum mismatch (the header is corrupt)");
        }
        uint headerSize = BinaryPrimitives.ReadUInt32LittleEndian(h.AsSpan(12));
        int blockSize = BinaryPrimitives.ReadInt32LittleEndian(h.AsSpan(32));
        int extentBlocks = BinaryPrimitives.ReadInt32LittleEndian(h.AsSpan(36));
        int extentCount = BinaryPrimitives.ReadInt32LittleEndian(h.AsSpan(40));
        if (headerSize != RegionLayout.HeaderSize || blockSize is not (512 or 4096) || extentBlocks is <= 0 or > RegionLayout.MaxExtentBlocks || extentCount is <= 0 or > RegionLayout.MaxExtentCount)
        {
            throw new RegionDamagedException(path, $"impossible geometry (header {headerSize}, block size {blockSize}, {extentBlocks} blocks per extent, {extentCount} extents)");
        }
        uint flags = BinaryPrimitives.ReadUInt32LittleEndian(h.AsSpan(44));
        return (new Guid(h.AsSpan(16, 16), bigEndian: true), new RegionGeometry(blockSize, extentBlocks, extentCount), (flags & RegionLayout.PreallocatedFlag) != 0);
    }

    // ---------------------------------------------------------------- generation fence

    /// <summary>Durably raises the highest generation seen (before the new upstairs is told it may do IO).</summary>
    public void RecordGeneration(ulong generation)
    {
        lock (_recordLock)
        {
            if (generation <= HighestGeneration)
            {
                return;
            }
            Span<byte> slot = stackalloc byte[RegionLayout.StateSlotSize];
            int next = 1 - _stateSlot;
            RegionLayout.WriteStateSlot(slot, _stateSeq + 1, generation);
            RandomAccess.Write(_meta, slot, next == 0 ? RegionLayout.StateSlotOffsetA : RegionLayout.StateSlotOffsetB);
            PosixFile.FlushToDisk(_meta, dataOnly: true, RegionLayout.MetaPath(_dir));
            (_stateSeq, _stateSlot, HighestGeneration) = (_stateSeq + 1, next, generation);
        }
    }

    // ---------------------------------------------------------------- block IO

    /// <summary>Writes whole blocks; <paramref name="hashes"/> holds one 8-byte hash per block (already verified).</summary>
    public void Write(BlockRange range, ReadOnlySpan<byte> hashes, ReadOnlyMemory<byte> data, ulong writeId)
    {
        CheckRange(range);
        int bs = Geometry.BlockSize;
        MarkDirty(range);
        for (long i = range.FirstBlock / Geometry.ExtentBlocks; i <= (range.EndBlock - 1) / Geometry.ExtentBlocks; i++)
        {
            _extents[i].WrittenSinceFlush = true;
        }
        byte[] contexts = ArrayPool<byte>.Shared.Rent(range.BlockCount * BlockContext.Size);
        try
        {
            for (int i = 0; i < range.BlockCount; i++)
            {
                Span<byte> c = contexts.AsSpan(i * BlockContext.Size, BlockContext.Size);
                hashes.Slice(i * Wire.HashSize, Wire.HashSize).CopyTo(c);
                BinaryPrimitives.WriteUInt64LittleEndian(c[8..], writeId);
            }
            ForEachPiece(range, (extent, inExtent, index, count) =>
            {
                RandomAccess.Write(extent.Handle!, data.Slice(index * bs, count * bs).Span, (long)inExtent * bs);
                RandomAccess.Write(extent.Handle!, contexts.AsSpan(index * BlockContext.Size, count * BlockContext.Size), Geometry.ContextOffset(inExtent));
            });
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(contexts);
        }
    }

    /// <summary>Reads blocks and their stored hashes (8 bytes per block; 0 = never written).</summary>
    public void Read(BlockRange range, Span<byte> hashes, Span<byte> data)
    {
        CheckRange(range);
        int bs = Geometry.BlockSize;
        byte[] contexts = ArrayPool<byte>.Shared.Rent(range.BlockCount * BlockContext.Size);
        try
        {
            int index = 0;
            long block = range.FirstBlock;
            while (index < range.BlockCount)
            {
                Extent extent = _extents[block / Geometry.ExtentBlocks];
                int inExtent = (int)(block % Geometry.ExtentBlocks);
                int count = Math.Min(range.BlockCount - index, Geometry.ExtentBlocks - inExtent);
                ReadExactly(extent.Handle!, data.Slice(index * bs, count * bs), (long)inExtent * bs, extent.Path);
                ReadExactly(extent.Handle!, contexts.AsSpan(index * BlockContext.Size, count * BlockContext.Size), Geometry.ContextOffset(inExtent), extent.Path);
                index += count;
                block += count;
            }
            for (int i = 0; i < range.BlockCount; i++)
            {
                contexts.AsSpan(i * BlockContext.Size, Wire.HashSize).CopyTo(hashes[(i * Wire.HashSize)..]);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(contexts);
        }
    }

    /// <summary>
    /// Makes every dirty extent durable and records (generation, flush number, clean) for each.
    /// Runs alone (the scheduler treats it as a barrier).
    /// </summary>
    /// <remarks>
    /// An uncertain extent that is not pending repair is stamped like any other, which clears its
    /// mark: after the fdatasync its blocks are durable, and the engine flushes a replica only for
    /// extents it holds current. A returning replica has every extent dirty on it (an uncertain one
    /// always is) marked pending (ExtentsPending) before the repair's first flush; an uncertain
    /// extent left unmarked is one reconciliation accepted as it is (the copy chosen as the source).
    /// Never clearing the mark here would leave such an extent uncertain for ever and copied whole
    /// on every later repair.
    /// </remarks>
    public void Flush(ulong flushNumber, ulong generation)
    {
        foreach (Extent e in _extents)
        {
            if (e.Poisoned && !e.RepairPending)
            {
                throw new PosixIOException(Errnos.EIO, $"flush refused: an earlier fdatasync failed ({e.PoisonReason}); the extent needs repair", e.Path);
            }
        }
        // Extents awaiting a live-repair copy hold stale data: never stamp them current (they stay as
        // recorded, so a crash mid-repair leaves them looking out of date, and they are copied again).
        List<Extent> dirty = [.. _extents.Where(e => e.Dirty && !e.RepairPending)];
        if (dirty.Count == 0)
        {
            return;
        }
        // Group commit: every dirty extent file is fdatasynced at once, each on its own thread. On
        // ext4 concurrent fsyncs join one journal commit, so 32 dirty extents cost about one fsync
        // instead of 32 in a row (4k random writes with a flush per 64: 1,250 → see docs/downstairs.md).
        Exception? failure = null;
        using (var done = new CountdownEvent(dirty.Count))
        {
            foreach (Extent e in dirty)
            {
                FsyncPool.Run(() =>
                {
                    try
                    {
                        PosixFile.FlushToDisk(e.Handle!, dataOnly: true, e.Path);
                    }
                    catch (Exception ex) when (IoErrors.IsIoFailure(ex))
                    {
                        e.Poisoned = true;
                        e.PoisonReason = ex.Message;
                        Interlocked.CompareExchange(ref failure, ex, null);
                    }
                    finally
                    {
                        done.Signal();
                    }
                });
            }
            done.Wait();
        }
        if (failure is not null)
        {
            RecordPoisoned([.. dirty.Where(e => e.Poisoned)]);
            throw failure;
        }
        // Sticky dirty (opt-in): an extent written since the last flush stays marked dirty, so the
        // next write to it needs no metadata fdatasync first; it is cleared by the first flush that
        // finds it idle. Conservative: dirty only ever makes the engine repair more.
        bool[] keepDirty = [.. dirty.Select(e => StickyDirty && e.WrittenSinceFlush)];
        foreach (Extent e in dirty)
        {
            e.WrittenSinceFlush = false;
        }
        int index = 0;
        WriteRecordsAndSync(dirty, e => (generation, flushNumber, keepDirty[index++], false));
    }

    // ---------------------------------------------------------------- live repair

    /// <summary>Reads part of an extent as it is on disk: its contexts (16 bytes per block) and blocks.</summary>
    public ExtentMeta ReadExtent(ExtentRange r, Span<byte> contexts, Span<byte> data)
    {
        Extent e = CheckExtentRange(r);
        ReadExactly(e.Handle!, data[..(r.BlockCount * Geometry.BlockSize)], (long)r.FirstBlock * Geometry.BlockSize, e.Path);
        ReadExactly(e.Handle!, contexts[..(r.BlockCount * BlockContext.Size)], Geometry.ContextOffset(r.FirstBlock), e.Path);
        return GetExtentMeta(r.Extent);
    }

    /// <summary>
    /// Catch-up: writes blocks of a healthy copy, with their contexts as stored there, into the live
    /// extent. Like any write it first makes the extent's dirty bit durable: a crash before the
    /// in-place commit leaves the extent dirty, and the engine copies it again.
    /// </summary>
    public void WriteInPlace(ExtentRange r, ReadOnlySpan<byte> contexts, ReadOnlySpan<byte> data)
    {
        Extent e = CheckExtentRange(r);
        var range = new BlockRange(((long)r.Extent * Geometry.ExtentBlocks) + r.FirstBlock, r.BlockCount);
        MarkDirty(range);
        e.WrittenSinceFlush = true;
        RandomAccess.Write(e.Handle!, data[..(r.BlockCount * Geometry.BlockSize)], (long)r.FirstBlock * Geometry.BlockSize);
        RandomAccess.Write(e.Handle!, contexts[..(r.BlockCount * BlockContext.Size)], Geometry.ContextOffset(r.FirstBlock));
    }

    /// <summary>Writes part of a healthy copy into the extent's staging file (the live extent is untouched).</summary>
    public void WriteStaging(ExtentRange r, ReadOnlySpan<byte> contexts, ReadOnlySpan<byte> data)
    {
        Extent e = CheckExtentRange(r);
        string staging = e.Path + RegionLayout.StagingSuffix;
        if (r.Begin || e.Staging is null)
        {
            e.Staging?.Dispose();
            e.Staging = null;
            e.Staging = CreateStaging(staging);
        }
        RandomAccess.Write(e.Staging, data[..(r.BlockCount * Geometry.BlockSize)], (long)r.FirstBlock * Geometry.BlockSize);
        RandomAccess.Write(e.Staging, contexts[..(r.BlockCount * BlockContext.Size)], Geometry.ContextOffset(r.FirstBlock));
    }

    /// <summary>
    /// Replaces the extent with its staging copy (blocks never sent read as unwritten) and records
    /// <paramref name="meta"/>. Order: fdatasync staging, rename over the extent, fsync the directory,
    /// then the record — a crash before the record leaves the old record, which the engine sees as
    /// still needing repair.
    /// </summary>
    public void CommitStaging(int extent, ExtentMeta meta)
    {
        if (extent < 0 || extent >= _extents.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(extent), $"extent {extent} is beyond the region's {_extents.Length} extents");
        }
        Extent e = _extents[extent];
        string staging = e.Path + RegionLayout.StagingSuffix;
        e.Staging ??= CreateStaging(staging);
        PosixFile.FlushToDisk(e.Staging, dataOnly: false, staging);
        e.Staging.Dispose();
        e.Staging = null;
        File.Move(staging, e.Path, overwrite: true);
        e.Handle!.Dispose();
        e.Handle = File.OpenHandle(e.Path, FileMode.Open, FileAccess.ReadWrite);
        PosixDirectory.FlushToDisk(Path.GetDirectoryName(e.Path)!);
        WriteRecordsAndSync([e], _ => (meta.Generation, meta.FlushNumber, meta.Dirty, false));
        e.Poisoned = false;
        e.PoisonReason = null;
        e.RepairPending = false;
    }

    /// <summary>
    /// Ends a catch-up repair of the extent: its changed blocks came as ordinary writes into the live
    /// file. Order: fdatasync the extent file, then record <paramref name="meta"/> — a crash before
    /// the record leaves the extent dirty (the writes made it so), which the engine repairs again.
    /// Refused for a poisoned extent: the kernel dropped pages of it that no fdatasync can bring
    /// back, and blocks the catch-up did not rewrite may be among them; only a staged whole copy
    /// (<see cref="CommitStaging"/>) can replace it.
    /// </summary>
    public void CommitInPlace(int extent, ExtentMeta meta)
    {
        if (extent < 0 || extent >= _extents.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(extent), $"extent {extent} is beyond the region's {_extents.Length} extents");
        }
        Extent e = _extents[extent];
        if (e.Poisoned)
        {
            throw new PosixIOException(Errnos.EIO, $"in-place commit refused: an earlier fdatasync failed ({e.PoisonReason}); the extent needs a staged whole copy", e.Path);
        }
        try
        {
            PosixFile.FlushToDisk(e.Handle!, dataOnly: true, e.Path);
        }
        catch (Exception ex) when (IoErrors.IsIoFailure(ex))
        {
            e.Poisoned = true;
            e.PoisonReason = ex.Message;
            RecordPoisoned([e]);
            throw;
        }
        WriteRecordsAndSync([e], _ => (meta.Generation, meta.FlushNumber, meta.Dirty, false));
        // The file is durable up to here, as after a flush (sticky dirty keys off this).
        e.WrittenSinceFlush = false;
        e.RepairPending = false;
    }

    /// <summary>
    /// Marks extents a live repair will copy: until each one's copy is committed, flushes leave it
    /// unstamped (and do not refuse because it is poisoned). In memory only: a restart forgets the
    /// marks, and the records they protected were never stamped.
    /// </summary>
    public void MarkRepairPending(IEnumerable<int> extents)
    {
        foreach (int extent in extents)
        {
            _extents[extent].RepairPending = true;
        }
    }

    public void ClearRepairPending()
    {
        foreach (Extent e in _extents)
        {
            e.RepairPending = false;
        }
    }

    public bool IsRepairPending(int extent) => _extents[extent].RepairPending;

    private SafeFileHandle CreateStaging(string path)
    {
        SafeFileHandle h = File.OpenHandle(path, FileMode.Create, FileAccess.ReadWrite);
        try
        {
            if (Preallocated)
            {
                PosixFile.Allocate(h, 0, Geometry.ExtentFileBytes, path);
            }
            else
            {
                RandomAccess.SetLength(h, Geometry.ExtentFileBytes);
            }
            return h;
        }
        catch
        {
            h.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Best effort: records freshly poisoned extents uncertain, so a restart (which forgets the
    /// poisoning) still reports them and they are copied whole. If region.meta fails too, the
    /// caller's error already says the operation failed; this one would add nothing.
    /// </summary>
    private void RecordPoisoned(List<Extent> poisoned)
    {
        poisoned.RemoveAll(e => e.Uncertain);
        if (poisoned.Count == 0)
        {
            return;
        }
        try
        {
            WriteRecordsAndSync(poisoned, e => (e.Generation, e.Flush, e.Dirty, true));
        }
        catch (Exception ex) when (IoErrors.IsIoFailure(ex))
        {
            // The extents stay poisoned in memory, and reported uncertain while this process runs.
        }
    }

    // ---------------------------------------------------------------- dirty marking (group commit)

    private void MarkDirty(BlockRange range)
    {
        int first = (int)(range.FirstBlock / Geometry.ExtentBlocks);
        int last = (int)((range.EndBlock - 1) / Geometry.ExtentBlocks);
        for (int i = first; i <= last; i++)
        {
            Extent e = _extents[i];
            if (!Volatile.Read(ref e.DirtyVolatile))
            {
                MarkDirtySlow(e);
            }
        }
    }

    private void MarkDirtySlow(Extent e)
    {
        DirtyBatch batch;
        bool leader = false;
        lock (_dirtyLock)
        {
            if (e.Dirty)
            {
                return;
            }
            batch = e.Batch ?? (_collecting ??= new DirtyBatch());
            if (e.Batch is null)
            {
                batch.Extents.Add(e);
                e.Batch = batch;
            }
            // One commit at a time; whoever finds none running commits everything collected so far.
            while (!batch.Done)
            {
                if (!_commitRunning && batch == _collecting)
                {
                    _collecting = null;
                    _commitRunning = true;
                    leader = true;
                    break;
                }
                Monitor.Wait(_dirtyLock);
            }
        }
        if (leader)
        {
            Exception? error = null;
            try
            {
                WriteRecordsAndSync(batch.Extents, x => (x.Generation, x.Flush, true, x.Uncertain));
            }
            catch (Exception ex) when (IoErrors.IsIoFailure(ex))
            {
                error = ex;
            }
            lock (_dirtyLock)
            {
                batch.Error = error;
                batch.Done = true;
                foreach (Extent x in batch.Extents)
                {
                    x.Batch = null;
                }
                _commitRunning = false;
                Monitor.PulseAll(_dirtyLock);
            }
        }
        if (batch.Error is { } failed)
        {
            throw new PosixIOException(IoErrors.Errno(failed), "marking extent dirty in region.meta", RegionLayout.MetaPath(_dir));
        }
    }

    private void WriteRecordsAndSync(IReadOnlyList<Extent> extents, Func<Extent, (ulong Generation, ulong Flush, bool Dirty, bool Uncertain)> next)
    {
        Span<byte> slot = stackalloc byte[RegionLayout.RecordSlotSize];
        var written = new (Extent E, ulong Seq, int Slot, ulong Gen, ulong Flush, bool Dirty, bool Uncertain)[extents.Count];
        for (int i = 0; i < extents.Count; i++)
        {
            Extent e = extents[i];
            (ulong gen, ulong flush, bool dirty, bool uncertain) = next(e);
            int s = 1 - e.Slot;
            RegionLayout.WriteRecord(slot, e.Seq + 1, gen, flush, dirty, uncertain);
            RandomAccess.Write(_meta, slot, RegionLayout.RecordOffset(e.Index, s));
            written[i] = (e, e.Seq + 1, s, gen, flush, dirty, uncertain);
        }
        PosixFile.FlushToDisk(_meta, dataOnly: true, RegionLayout.MetaPath(_dir));
        // Only now does the new slot become current: if the sync failed, the next update rewrites the
        // same slot and the last durable one stays intact.
        lock (_recordLock)
        {
            foreach ((Extent e, ulong seq, int s, ulong gen, ulong flush, bool dirty, bool uncertain) in written)
            {
                (e.Seq, e.Slot, e.Generation, e.Flush, e.Uncertain) = (seq, s, gen, flush, uncertain);
                _highestFlushRecorded = Math.Max(_highestFlushRecorded, flush);
                e.Dirty = dirty;
            }
        }
    }

    // ---------------------------------------------------------------- helpers

    private void CheckRange(BlockRange range)
    {
        if (!range.IsWithin(Geometry.BlockCount))
        {
            throw new ArgumentOutOfRangeException(nameof(range), $"blocks {range.FirstBlock}+{range.BlockCount} are beyond the region's {Geometry.BlockCount} blocks");
        }
    }

    private Extent CheckExtentRange(ExtentRange r)
    {
        if (!r.IsWithin(_extents.Length, Geometry.ExtentBlocks))
        {
            throw new ArgumentOutOfRangeException(nameof(r), $"extent {r.Extent} blocks {r.FirstBlock}+{r.BlockCount} are beyond the region ({_extents.Length} extents of {Geometry.ExtentBlocks} blocks)");
        }
        return _extents[r.Extent];
    }

    private void ForEachPiece(BlockRange range, Action<Extent, int, int, int> piece)
    {
        int index = 0;
        long block = range.FirstBlock;
        while (index < range.BlockCount)
        {
            Extent extent = _extents[block / Geometry.ExtentBlocks];
            int inExtent = (int)(block % Geometry.ExtentBlocks);
            int count = Math.Min(range.BlockCount - index, Geometry.ExtentBlocks - inExtent);
            piece(extent, inExtent, index, count);
            index += count;
            block += count;
        }
    }

    private static void ReadExactly(SafeFileHandle h, Span<byte> buffer, long offset, string path)
    {
        while (!buffer.IsEmpty)
        {
            int n = RandomAccess.Read(h, buffer, offset);
            if (n <= 0)
            {
                throw new RegionDamagedException(path, $"unexpected end of file at offset {offset}");
            }
            buffer = buffer[n..];
            offset += n;
        }
    }

    public void Dispose()
    {
        foreach (Extent e in _extents)
        {
            e.Staging?.Dispose();
            e.Handle?.Dispose();
        }
        _meta.Dispose();
        _lock?.Dispose();
    }

    private sealed class DirtyBatch
    {
        public List<Extent> Extents { get; } = [];

        public bool Done { get; set; }

        public Exception? Error { get; set; }
    }

    private sealed class Extent(int index, string path)
    {
        public bool DirtyVolatile;

        public int Index { get; } = index;

        public string Path { get; } = path;

        public SafeFileHandle? Handle { get; set; }

        public SafeFileHandle? Staging { get; set; }

        public ulong Seq { get; set; }

        public int Slot { get; set; }

        public ulong Generation { get; set; }

        public ulong Flush { get; set; }

        /// <summary>
        /// Recorded uncertain in region.meta (poisoned, or dirty when opened after a reboot); see
        /// <see cref="Region"/>'s rule 5. Only ever set on a dirty extent, and cleared by whatever
        /// records it clean (a flush, a commit), so uncertain implies dirty.
        /// </summary>
        public bool Uncertain { get; set; }

        /// <summary>Dirty as recorded durably in region.meta.</summary>
        public bool Dirty
        {
            get => Volatile.Read(ref DirtyVolatile);
            set => Volatile.Write(ref DirtyVolatile, value);
        }

        public bool Poisoned { get; set; }

        /// <summary>Awaiting a live-repair copy (see <see cref="MarkRepairPending"/>); written by barrier and commit jobs only.</summary>
        public bool RepairPending { get; set; }

        /// <summary>Written since the last flush (changed only by writers and the flush barrier).</summary>
        public bool WrittenSinceFlush { get; set; }

        public string? PoisonReason { get; set; }

        /// <summary>The dirty-marking commit that will (or does) cover this extent; guarded by _dirtyLock.</summary>
        public DirtyBatch? Batch { get; set; }
    }
}
