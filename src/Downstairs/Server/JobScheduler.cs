using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;

namespace NbdServer.Downstairs.Server;

internal enum JobAccess
{
    /// <summary>Runs in parallel with other reads of the same blocks.</summary>
    Read,
    /// <summary>Ordered after every earlier job touching the same blocks.</summary>
    Write,
    /// <summary>Ordered after every earlier job, and every later job after it (flush).</summary>
    Barrier,
}

/// <summary>A unit of disk work over blocks [FirstBlock, EndBlock).</summary>
internal abstract class IoJob
{
    private int _pending;
    private List<IoJob>? _dependents;
    private LinkedListNode<IoJob>? _node;

    public abstract long FirstBlock { get; }

    public abstract long EndBlock { get; }

    public abstract JobAccess Access { get; }

    /// <summary>The disk work, on an IO thread. Must catch its own errors.</summary>
    public abstract void Execute();

    internal bool ConflictsWith(IoJob later) =>
        Access == JobAccess.Barrier || later.Access == JobAccess.Barrier
        || (!(Access == JobAccess.Read && later.Access == JobAccess.Read) && FirstBlock < later.EndBlock && later.FirstBlock < EndBlock);

    internal sealed class State(JobScheduler owner)
    {
        public void Submit(IoJob job, List<IoJob> ready)
        {
            foreach (IoJob earlier in owner.Active)
            {
                if (earlier.ConflictsWith(job))
                {
                    (earlier._dependents ??= []).Add(job);
                    job._pending++;
                }
            }
            job._node = owner.Active.AddLast(job);
            if (job._pending == 0)
            {
                ready.Add(job);
            }
        }

        public void Finish(IoJob job, List<IoJob> ready)
        {
            owner.Active.Remove(job._node!);
            job._node = null;
            if (job._dependents is null)
            {
                return;
            }
            foreach (IoJob d in job._dependents)
            {
                if (--d._pending == 0)
                {
                    ready.Add(d);
                }
            }
            job._dependents = null;
        }
    }
}

/// <summary>
/// Orders jobs and runs them on dedicated IO threads. Jobs that overlap run in the order they were
/// submitted; others run in parallel. File IO blocks (pwrite, fdatasync), so it gets its own
/// threads rather than the thread pool, where a slow disk would starve socket work.
/// </summary>
/// <remarks>
/// The active list is scanned on every submit: O(jobs in flight), bounded by the per-connection
/// job limit; at 1,024 jobs that is ~1 µs, far below one IO.
/// </remarks>
internal sealed class JobScheduler : IDisposable
{
    private readonly Lock _lock = new();
    private readonly BlockingCollection<IoJob> _ready = [];
    private readonly Thread[] _threads;
    private readonly IoJob.State _state;
    private readonly LogThrottle? _throttle;

    /// <param name="throttle">Where a job that throws despite its own error handling is reported.</param>
    public JobScheduler(int ioThreads, LogThrottle? throttle = null)
    {
        _throttle = throttle;
        _state = new IoJob.State(this);
        _threads = new Thread[ioThreads];
        for (int i = 0; i < ioThreads; i++)
        {
            _threads[i] = new Thread(Run) { IsBackground = true, Name = $"ds-io-{i}" };
            _threads[i].Start();
        }
    }

    internal LinkedList<IoJob> Active { get; } = new();

    public void Submit(IoJob job)
    {
        var ready = new List<IoJob>(1);
        lock (_lock)
        {
            _state.Submit(job, ready);
        }
        foreach (IoJob r in ready)
        {
            _ready.Add(r);
        }
    }

    private void Run()
    {
        var ready = new List<IoJob>();
        try
        {
            foreach (IoJob job in _ready.GetConsumingEnumerable())
            {
                try
                {
                    job.Execute();
                }
                catch (Exception e)
                {
                    // Jobs catch their own errors; this is the last line: an exception escaping an IO
                    // thread would end the process (every connection, every region) for one bad job.
                    _throttle?.Report(LogLevel.Error, "IO job failed", () => e.ToString());
                }
                lock (_lock)
                {
                    _state.Finish(job, ready);
                }
                foreach (IoJob r in ready)
                {
                    _ready.Add(r);
                }
                ready.Clear();
            }
        }
        catch (ObjectDisposedException)
        {
            // Shutting down.
        }
        catch (InvalidOperationException)
        {
            // CompleteAdding raced with a hand-off: shutting down.
        }
    }

    public void Dispose()
    {
        _ready.CompleteAdding();
        foreach (Thread t in _threads)
        {
            t.Join(TimeSpan.FromSeconds(5));
        }
    }
}
