Console.Error.WriteLine("nbd-downstairs: not implemented yet");
return 2;
