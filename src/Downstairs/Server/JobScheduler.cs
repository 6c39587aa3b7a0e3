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

    /// <summary>The disk work, on an IO thread (or its submitter's, see <see cref="MayRunInline"/>). Must catch its own errors.</summary>
    public abstract void Execute();

    /// <summary>Short enough to run on the submitting connection's receive path when nothing blocks it (not a flush).</summary>
    public virtual bool MayRunInline => false;

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
/// <para>The active list is scanned on every submit: O(jobs in flight), bounded by the per-connection
/// job limit; at 1,024 jobs that is ~1 µs, far below one IO.</para>
/// <para>Idle IO threads sleep in <see cref="Monitor.Wait(object)"/> and are woken one per ready job.
/// The earlier BlockingCollection (a SemaphoreSlim underneath) spun and then called sched_yield
/// before every sleep: with a job every few microseconds, idle IO threads burnt the CPU the
/// socket threads needed (docs/benchmarks.md, downstairs).</para>
/// <para>A connection hands over all jobs parsed from one receive at once (one lock, one wake per
/// job that can start), and may run the ones that are ready on its own thread instead of waking an IO
/// thread: see <see cref="Submit(List{IoJob}, List{IoJob}?)"/>.</para>
/// </remarks>
internal sealed class JobScheduler : IDisposable
{
    private readonly object _gate = new(); // Monitor: guards the job state and the ready queue; idle IO threads wait on it
    private readonly Queue<IoJob> _ready = new();
    private readonly List<IoJob> _released = [];
    private readonly Thread[] _threads;
    private readonly IoJob.State _state;
    private readonly LogThrottle? _throttle;
    private int _idle;
    private bool _stopping;

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

    public void Submit(IoJob job) => Submit([job], null);

    /// <summary>
    /// Submits <paramref name="jobs"/> in order. With <paramref name="runHere"/>, the ones that can
    /// start now and <see cref="IoJob.MayRunInline"/> are added to it instead of being queued: the
    /// caller runs each and then calls <see cref="Finish"/>. The rest go to the IO threads.
    /// </summary>
    public void Submit(List<IoJob> jobs, List<IoJob>? runHere)
    {
        lock (_gate)
        {
            foreach (IoJob job in jobs)
            {
                _state.Submit(job, _released);
            }
            foreach (IoJob r in _released)
            {
                if (runHere is not null && r.MayRunInline)
                {
                    runHere.Add(r);
                }
                else
                {
                    _ready.Enqueue(r);
                }
            }
            _released.Clear();
            WakeLocked();
        }
    }

    /// <summary>Retires a job its submitter ran itself; the jobs waiting on it go to the IO threads.</summary>
    public void Finish(IoJob job)
    {
        lock (_gate)
        {
            FinishLocked(job);
            WakeLocked();
        }
    }

    /// <summary>Runs a job, logging what escapes its own error handling (which would end the thread).</summary>
    public void Execute(IoJob job)
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
    }

    private void FinishLocked(IoJob job)
    {
        _state.Finish(job, _released);
        foreach (IoJob r in _released)
        {
            _ready.Enqueue(r);
        }
        _released.Clear();
    }

    /// <summary>One waiting thread per queued job (no more: a woken thread with nothing to do is wasted).</summary>
    private void WakeLocked()
    {
        for (int n = Math.Min(_idle, _ready.Count); n > 0; n--)
        {
            Monitor.Pulse(_gate);
        }
    }

    private void Run()
    {
        IoJob? done = null;
        while (true)
        {
            IoJob job;
            lock (_gate)
            {
                if (done is not null)
                {
                    FinishLocked(done);
                    done = null;
                    // This thread takes one of the released jobs; wake others for the rest.
                    for (int n = Math.Min(_idle, _ready.Count - 1); n > 0; n--)
                    {
                        Monitor.Pulse(_gate);
                    }
                }
                while (_ready.Count == 0)
                {
                    if (_stopping)
                    {
                        return;
                    }
                    _idle++;
                    Monitor.Wait(_gate);
                    _idle--;
                }
                job = _ready.Dequeue();
            }
            Execute(job);
            done = job;
        }
    }

    public void Dispose()
    {
        lock (_gate)
        {
            _stopping = true;
            Monitor.PulseAll(_gate);
        }
        foreach (Thread t in _threads)
        {
            t.Join(TimeSpan.FromSeconds(5));
        }
    }
}
