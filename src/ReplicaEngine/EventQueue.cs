using System.Collections.Concurrent;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The engine's event loop: events are applied one at a time, in the order posted, and nothing
/// else touches the state they change. The loop is not a thread of its own: whichever thread posts
/// to an idle queue runs it until it is empty, so a downstairs reply completes its job on the
/// socket thread that read it, and a guest request is dispatched by the thread that parsed it —
/// no hand-off, no wake-up. A thread posting while the loop runs only enqueues; the running thread
/// applies that event too, in turn.
/// </summary>
/// <remarks>
/// A runner gives up the loop after <see cref="MaxEventsPerTurn"/> events and passes the rest to
/// the thread pool, so no poster is held for long. After each turn <c>settle</c> runs: the
/// invariants (admission, batches sent) are restored and completions delivered there, never in the
/// middle of an event.
/// </remarks>
internal sealed class EventQueue<T>(Action<T> apply, Action settle, Action<Exception> failed)
{
    private const int MaxEventsPerTurn = 256;

    [ThreadStatic]
    private static EventQueue<T>? t_running;

    private readonly ConcurrentQueue<T> _queue = new();
    private int _running;

    /// <summary>True on the thread currently running this loop (code here may read the loop's state directly).</summary>
    public bool IsCurrentThread => t_running == this;

    public void Post(T item)
    {
        _queue.Enqueue(item);
        Run(inline: true);
    }

    private void Run(bool inline)
    {
        while (!_queue.IsEmpty && Interlocked.CompareExchange(ref _running, 1, 0) == 0)
        {
            EventQueue<T>? outer = t_running;
            t_running = this;
            int applied = 0;
            try
            {
                while (applied < MaxEventsPerTurn && _queue.TryDequeue(out T? item))
                {
                    applied++;
                    try
                    {
                        apply(item);
                    }
                    catch (Exception e)
                    {
                        // One bad event (a bug) must not end the loop and with it every volume's IO.
                        failed(e);
                    }
                }
                try
                {
                    settle();
                }
                catch (Exception e)
                {
                    failed(e);
                }
            }
            finally
            {
                t_running = outer;
                Volatile.Write(ref _running, 0);
            }
            if (applied == MaxEventsPerTurn && inline)
            {
                ThreadPool.UnsafeQueueUserWorkItem(static q => q.Run(inline: false), this, preferLocal: false);
                return;
            }
        }
    }
}
