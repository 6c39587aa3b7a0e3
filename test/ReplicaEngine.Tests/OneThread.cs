using System.Collections.Concurrent;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>
/// Runs an async test body with every continuation it captures on one dedicated thread (a
/// single-threaded <see cref="SynchronizationContext"/>). Used where a test needs
/// <c>ArrayPool&lt;byte&gt;.Shared</c> to hand a buffer just returned on that thread to the next
/// renter on that thread, as it does (per-thread cache first) — deterministically, not by luck.
/// </summary>
internal static class OneThread
{
    public static Task RunAsync(Func<Task> body, TimeSpan limit)
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var thread = new Thread(() =>
        {
            var context = new PumpContext();
            SynchronizationContext.SetSynchronizationContext(context);
            Task task;
            try
            {
                task = body();
            }
            catch (Exception e)
            {
                done.TrySetException(e);
                return;
            }
            context.Pump(task, limit);
            if (!task.IsCompleted)
            {
                done.TrySetException(new TimeoutException($"the test body did not finish within {limit.TotalSeconds:0.#} s"));
            }
            else if (task.IsFaulted)
            {
                done.TrySetException(task.Exception!.InnerExceptions);
            }
            else if (task.IsCanceled)
            {
                done.TrySetCanceled();
            }
            else
            {
                done.TrySetResult();
            }
        })
        {
            IsBackground = true,
            Name = "one-thread test pump",
        };
        thread.Start();
        return done.Task;
    }

    private sealed class PumpContext : SynchronizationContext
    {
        private readonly BlockingCollection<(SendOrPostCallback Callback, object? State)> _queue = [];

        public override void Post(SendOrPostCallback d, object? state)
        {
            try
            {
                _queue.Add((d, state));
            }
            catch (InvalidOperationException)
            {
                // The pump has finished: run it on the pool rather than lose it.
                ThreadPool.QueueUserWorkItem(_ => d(state));
            }
        }

        public override void Send(SendOrPostCallback d, object? state) => throw new NotSupportedException("synchronous send to the test pump");

        public override SynchronizationContext CreateCopy() => this;

        /// <summary>Runs posted callbacks until <paramref name="task"/> completes or the time is up.</summary>
        public void Pump(Task task, TimeSpan limit)
        {
            _ = task.ContinueWith(_ => Post(static _ => { }, null), TaskScheduler.Default);
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (!task.IsCompleted)
            {
                TimeSpan left = limit - clock.Elapsed;
                if (left <= TimeSpan.Zero)
                {
                    break;
                }
                if (_queue.TryTake(out var item, left))
                {
                    item.Callback(item.State);
                }
            }
            _queue.CompleteAdding();
            // Whatever was posted after the body ended still runs, elsewhere.
            while (_queue.TryTake(out var rest))
            {
                ThreadPool.QueueUserWorkItem(_ => rest.Callback(rest.State));
            }
        }
    }
}
