using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Protocol;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Server;

/// <summary>
/// What all connections to one region share: the region, the IO scheduler, the error throttle and
/// the generation fence (DESIGN §3: only the highest generation seen may do IO).
/// </summary>
internal sealed class RegionHost : IDisposable
{
    private readonly Lock _fenceLock = new();
    private DownstairsConnection? _writer;

    /// <summary>Negotiated connections other than the writer, oldest first (guarded by _fenceLock).</summary>
    private readonly List<DownstairsConnection> _others = [];

    public RegionHost(Region region, DownstairsOptions options, ILogger logger)
    {
        Region = region;
        Options = options;
        Logger = logger;
        Throttle = new LogThrottle(logger, options.LogSummaryInterval);
        Memory = new MemoryBudget(options.MaxMemoryBytes, options.WriterMemoryReserve);
        Scheduler = new JobScheduler(options.IoThreads, Throttle);
        region.StickyDirty = options.StickyDirty;
    }

    public Region Region { get; }

    public DownstairsOptions Options { get; }

    public ILogger Logger { get; }

    public JobScheduler Scheduler { get; }

    public LogThrottle Throttle { get; }

    public MemoryBudget Memory { get; }

    /// <summary>The connection holding the fence, if any (tests watch a writer leave).</summary>
    internal DownstairsConnection? Writer => Volatile.Read(ref _writer);

    /// <summary>True while <paramref name="connection"/> holds the fence (it gets the writer's memory reserve).</summary>
    public bool IsWriter(DownstairsConnection connection) => Volatile.Read(ref _writer) == connection;

    /// <summary>Decides a Hello. Null: accepted (and, for a writer, the fence now belongs to it).</summary>
    public (ResultCode Code, int Errno, string Message)? Negotiate(HelloRequest hello, DownstairsConnection connection)
    {
        if (hello.Version != Wire.ProtocolVersion)
        {
            return (ResultCode.VersionMismatch, 0, $"protocol version {hello.Version} requested; this downstairs speaks version {Wire.ProtocolVersion}");
        }
        if (hello.RegionId != Guid.Empty && hello.RegionId != Region.Uuid)
        {
            return (ResultCode.WrongRegion, 0, $"region {hello.RegionId} requested; this downstairs serves region {Region.Uuid}");
        }
        if (hello.ReadOnly)
        {
            lock (_fenceLock)
            {
                if (_others.Count >= Options.MaxConnections)
                {
                    return (ResultCode.Unavailable, 0, $"already {_others.Count} connections besides the writer (--max-connections)");
                }
                _others.Add(connection);
            }
            return null;
        }
        if (hello.Generation is 0 or > Wire.MaxGeneration)
        {
            return (ResultCode.Invalid, 0, $"generation {hello.Generation} is not valid for a writer (1 to {Wire.MaxGeneration})");
        }
        DownstairsConnection? previous;
        lock (_fenceLock)
        {
            ulong highest = Region.HighestGeneration;
            if (hello.Generation < highest)
            {
                return (ResultCode.Fenced, 0, $"generation {hello.Generation} is older than generation {highest}, which has already taken over this region");
            }
            // hello.Generation >= highest here, so the subtraction cannot wrap.
            if (hello.Generation - highest > Options.MaxGenerationStep)
            {
                return (ResultCode.Invalid, 0, $"generation {hello.Generation} would raise this region's highest generation {highest} by more than --max-generation-step ({Options.MaxGenerationStep})");
            }
            if (hello.Generation == highest && _writer is { } w && w.UpstairsId != hello.UpstairsId)
            {
                return (ResultCode.Fenced, 0, $"generation {hello.Generation} is held by upstairs {w.UpstairsId}; a new activation needs a higher generation");
            }
            try
            {
                Region.RecordGeneration(hello.Generation);
            }
            catch (IOException e)
            {
                int errno = IoErrors.Errno(e);
                return (IoErrors.Result(errno), errno, $"cannot record generation {hello.Generation}: {e.Message}");
            }
            previous = _writer;
            _writer = connection;
            _others.Remove(connection);
        }
        DownstairsConnection? evicted = null;
        if (previous is not null && previous != connection)
        {
            lock (_fenceLock)
            {
                // The fenced writer stays connected (it must hear "fenced"), now as one of the others;
                // if that overfills them, the oldest other goes: the slot limit holds.
                _others.Add(previous);
                if (_others.Count > Options.MaxConnections)
                {
                    evicted = _others[0];
                    _others.RemoveAt(0);
                }
            }
            previous.Fence(hello.Generation);
        }
        evicted?.Close("evicted: a new writer took over and the other connections were at --max-connections");
        return null;
    }

    /// <summary>
    /// A new writer's first step, before its Hello is answered: the repair marks of the writers
    /// before it are cleared (a new writer's repair sets its own), in the job order. Cleared at once,
    /// a flush an earlier connection left queued would run after the clear and stamp the extents its
    /// repair had not copied yet: stale data recorded as current, which a stop before the next
    /// repair would leave looking equal to the good copies. As a barrier, every job submitted before
    /// it (by any connection) runs first, and the new writer's jobs, sent after the answer, after it.
    /// </summary>
    public Task ClearRepairMarksAsync()
    {
        var job = new ClearRepairMarksJob(Region);
        Scheduler.Submit(job);
        return job.Done;
    }

    private sealed class ClearRepairMarksJob(Region region) : IoJob
    {
        private readonly TaskCompletionSource _done = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public Task Done => _done.Task;

        public override long FirstBlock => 0;

        public override long EndBlock => long.MaxValue;

        public override JobAccess Access => JobAccess.Barrier;

        public override void Execute()
        {
            region.ClearRepairPending();
            _done.TrySetResult();
        }
    }

    public void Unregister(DownstairsConnection connection)
    {
        lock (_fenceLock)
        {
            if (_writer == connection)
            {
                _writer = null;
            }
            _others.Remove(connection);
        }
    }

    public void Dispose()
    {
        Scheduler.Dispose();
        Throttle.Dispose();
        Region.Dispose();
    }
}
