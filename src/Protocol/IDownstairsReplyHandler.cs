namespace NbdServer.Protocol;

/// <summary>Receives the outcome of jobs submitted with the <c>Submit…</c> methods of <see cref="DownstairsClient"/>.</summary>
public interface IDownstairsReplyHandler
{
    /// <summary>
    /// Called exactly once per submitted job id, on one of the client's own threads (its receive loop,
    /// its sender, or the thread pool for a job submitted after the link failed; at worst the thread
    /// disposing the client), never inside a <c>Submit…</c> or <c>EndBatch</c> call. For Read/ExtentRead the destination memory has been filled before this call.
    /// When this is called the client will never touch that job's payload or destination memory again:
    /// a reply that overtakes its own request's send (a peer answering early) is held back until the
    /// send has finished, and a link failure is delivered only after the sender has stopped using the
    /// job's frame. A link failure is <see cref="DownstairsResult.IsLinkFailure"/>; <paramref name="meta"/>
    /// is meaningful for a successful ExtentRead only. Must not throw (an exception fails the link) and
    /// should not block: replies to other jobs wait behind it.
    /// </summary>
    void OnReply(ulong jobId, DownstairsResult result, ExtentMeta meta);
}
