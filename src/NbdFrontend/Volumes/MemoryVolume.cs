using System.Collections.Concurrent;
using NbdServer.Common.Volumes;

namespace NbdServer.Frontend.Volumes;

/// <summary>
/// A sparse volume in RAM (like <c>nbdkit memory</c>): pages are allocated on first write and
/// dropped again by TRIM or WRITE_ZEROES, so an 8 GiB volume costs only what is written.
/// </summary>
internal sealed class MemoryVolume : IBlockVolume
{
    /// <summary>64 KiB pages: small enough that a 4 KiB random write wastes little, large enough to keep the map short.</summary>
    internal const int PageSize = 64 * 1024;

    private readonly ConcurrentDictionary<long, byte[]> _pages = new();

    public MemoryVolume(long size, bool readOnly = false)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        Size = size;
        Features = VolumeFeatures.Flush | VolumeFeatures.ForceUnitAccess | VolumeFeatures.Trim | VolumeFeatures.WriteZeroes
            | VolumeFeatures.FastZero | VolumeFeatures.MultiConnection | VolumeFeatures.Cache | VolumeFeatures.BlockStatus
            | (readOnly ? VolumeFeatures.ReadOnly : VolumeFeatures.None);
    }

    public long Size { get; }

    public VolumeFeatures Features { get; }

    public int MinimumBlockSize => 1;

    public int PreferredBlockSize => 4096;

    /// <summary>Bytes of RAM holding data (for tests and status).</summary>
    public long AllocatedBytes => (long)_pages.Count * PageSize;

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        Span<byte> span = destination.Span;
        while (!span.IsEmpty)
        {
            (long page, int inPage, int count) = Locate(offset, span.Length);
            if (_pages.TryGetValue(page, out byte[]? data))
            {
                data.AsSpan(inPage, count).CopyTo(span);
            }
            else
            {
                span[..count].Clear();
            }
            span = span[count..];
            offset += count;
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, WriteOptions options, CancellationToken cancellationToken)
    {
        ReadOnlySpan<byte> span = source.Span;
        while (!span.IsEmpty)
        {
            (long page, int inPage, int count) = Locate(offset, span.Length);
            byte[] data = _pages.GetOrAdd(page, static _ => new byte[PageSize]);
            span[..count].CopyTo(data.AsSpan(inPage));
            span = span[count..];
            offset += count;
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask FlushAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    public ValueTask TrimAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken)
    {
        Zero(offset, length);
        return ValueTask.CompletedTask;
    }

    public ValueTask WriteZeroesAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken)
    {
        // NO_HOLE asks that the range stay allocated; in RAM a dropped page and a zeroed page read the
        // same and nothing can run out of space later except memory itself, so we always drop pages.
        Zero(offset, length);
        return ValueTask.CompletedTask;
    }

    public ValueTask<IReadOnlyList<AllocationExtent>> GetAllocationAsync(long offset, long length, int maxExtents, CancellationToken cancellationToken)
    {
        var extents = new List<AllocationExtent>();
        long end = offset + length;
        while (offset < end)
        {
            (long page, int inPage, int count) = Locate(offset, (int)Math.Min(end - offset, PageSize));
            AllocationState state = _pages.ContainsKey(page) ? AllocationState.Data : AllocationState.Hole | AllocationState.Zero;
            if (extents.Count > 0 && extents[^1].State == state)
            {
                // Keep growing the last extent even at the cap: REQ_ONE (qemu) wants it as long as possible.
                extents[^1] = extents[^1] with { Length = extents[^1].Length + count };
            }
            else if (extents.Count == maxExtents)
            {
                break;
            }
            else
            {
                extents.Add(new AllocationExtent(count, state));
            }
            offset += count;
            _ = inPage;
        }
        return ValueTask.FromResult<IReadOnlyList<AllocationExtent>>(extents);
    }

    public ValueTask DisposeAsync()
    {
        _pages.Clear();
        return ValueTask.CompletedTask;
    }

    private void Zero(long offset, long length)
    {
        long end = offset + length;
        long firstWholePage = (offset + PageSize - 1) / PageSize;
        long endWholePage = end / PageSize;
        if (firstWholePage >= endWholePage)
        {
            ClearPartial(offset, end);
            return;
        }
        ClearPartial(offset, firstWholePage * PageSize);
        ClearPartial(endWholePage * PageSize, end);
        // A multi-GiB discard over a mostly empty volume should cost the pages that exist, not the range.
        if (endWholePage - firstWholePage > _pages.Count)
        {
            foreach (long page in _pages.Keys)
            {
                if (page >= firstWholePage && page < endWholePage)
                {
                    _pages.TryRemove(page, out _);
                }
            }
        }
        else
        {
            for (long page = firstWholePage; page < endWholePage; page++)
            {
                _pages.TryRemove(page, out _);
            }
        }
    }

    private void ClearPartial(long offset, long end)
    {
        while (offset < end)
        {
            (long page, int inPage, int count) = Locate(offset, (int)Math.Min(end - offset, PageSize));
            if (_pages.TryGetValue(page, out byte[]? data))
            {
                data.AsSpan(inPage, count).Clear();
            }
            offset += count;
        }
    }

    private static (long Page, int InPage, int Count) Locate(long offset, int length)
    {
        long page = offset / PageSize;
        int inPage = (int)(offset % PageSize);
        return (page, inPage, Math.Min(length, PageSize - inPage));
    }
}
